"""The console's settings: where it listens, who may use it, whether it may act.

Credentials come from the environment only (never from the command line, where `ps` shows
them): ``RCMD_CONSOLE_TOKEN`` (a bearer token; a browser signs in once at
``/login?token=...``), or ``RCMD_CONSOLE_USER`` + ``RCMD_CONSOLE_PASSWORD`` (HTTP basic auth).
Listening on anything but a loopback address requires one of them.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass

from commandbus.exceptions import ValidationError

TOKEN_ENV = "RCMD_CONSOLE_TOKEN"
USER_ENV = "RCMD_CONSOLE_USER"
PASSWORD_ENV = "RCMD_CONSOLE_PASSWORD"
#: Shortest token accepted: a guessable token is no protection.
MIN_TOKEN_LENGTH = 16


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ConsoleSettings:
    """How the console serves. `read_only`: every page, no action (no form, POSTs refused)."""

    host: str = "127.0.0.1"
    port: int = 8000
    read_only: bool = False
    token: str | None = None
    username: str | None = None
    password: str | None = None

    @property
    def requires_auth(self) -> bool:
        return self.token is not None or self.username is not None

    @classmethod
    def from_env(
        cls,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        read_only: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> ConsoleSettings:
        """Settings with credentials from the environment, checked (:meth:`check`)."""
        e = os.environ if env is None else env
        settings = cls(
            host=host,
            port=port,
            read_only=read_only,
            token=e.get(TOKEN_ENV) or None,
            username=e.get(USER_ENV) or None,
            password=e.get(PASSWORD_ENV) or None,
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Raise ValidationError naming the setting that makes the console unsafe or unusable."""
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ValidationError("port", self.port, "must be an integer")
        if not 0 <= self.port <= 65535:
            raise ValidationError("port", self.port, "must be from 0 to 65535")
        if self.token is not None and len(self.token) < MIN_TOKEN_LENGTH:
            raise ValidationError(
                TOKEN_ENV, "<hidden>", f"must be at least {MIN_TOKEN_LENGTH} characters"
            )
        if (self.username is None) != (self.password is None):
            raise ValidationError(
                USER_ENV if self.username is None else PASSWORD_ENV,
                None,
                f"{USER_ENV} and {PASSWORD_ENV} go together",
            )
        if not is_loopback(self.host) and not self.requires_auth:
            raise ValidationError(
                "host",
                self.host,
                f"is not a loopback address: set {TOKEN_ENV}, or {USER_ENV} and "
                f"{PASSWORD_ENV}, to listen on it",
            )
