"""Whether a Docker engine answers here: testcontainers runs only where one does (never the
only way to run the tests). A module of its own, not conftest.py: a test that imported
`conftest` got whichever conftest.py was imported last (tests/faults/ has one too)."""

from __future__ import annotations

import os
import socket


def docker_answers() -> bool:
    """True when a Docker engine answers its ping (unix socket of DOCKER_HOST or the default)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return False  # a remote engine: set RCMD_TESTCONTAINERS and let testcontainers try
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(host.removeprefix("unix://"))
            sock.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            return b"OK" in sock.recv(4096)
    except OSError:
        return False
