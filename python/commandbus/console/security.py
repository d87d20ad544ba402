"""Who may use the console, and proof that a state-changing request comes from its own page.

* Authentication (when credentials are configured): HTTP basic auth, a bearer token, or the
  session cookie set by ``/login?token=...``. Compared in constant time.
* CSRF: every state-changing request is a POST carrying the token of the ``rcmd_csrf`` cookie
  (SameSite=Strict) in the form field ``csrf_token`` or the ``X-CSRF-Token`` header (htmx
  sends it from the page's ``hx-headers``); a POST whose Origin is another site is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from urllib.parse import urlsplit

from starlette.requests import Request

from commandbus.console.settings import ConsoleSettings

CSRF_COOKIE = "rcmd_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SESSION_COOKIE = "rcmd_session"


class Guard:
    """The checks of one console process (its secret signs the session cookie)."""

    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        self._secret = secrets.token_bytes(32)

    # -- authentication ------------------------------------------------------------------

    def session_value(self) -> str:
        token = self.settings.token or ""
        return hmac.new(self._secret, token.encode(), hashlib.sha256).hexdigest()

    def token_ok(self, token: str | None) -> bool:
        expected = self.settings.token
        return (
            expected is not None
            and token is not None
            and hmac.compare_digest(token.encode(), expected.encode())
        )

    def authenticated_user(self, request: Request) -> str | None:
        """The user a request authenticates as ("" when no credentials are configured), or
        None when it does not authenticate."""
        s = self.settings
        if not s.requires_auth:
            return ""
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and self.token_ok(value.strip()):
            return "token"
        if scheme.lower() == "basic" and s.username is not None and s.password is not None:
            try:
                user, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            user_ok = hmac.compare_digest(user.encode(), s.username.encode())
            password_ok = hmac.compare_digest(password.encode(), s.password.encode())
            return user if user_ok and password_ok else None
        cookie = request.cookies.get(SESSION_COOKIE)
        session = self.session_value().encode()
        if (
            s.token is not None
            and cookie is not None
            and hmac.compare_digest(cookie.encode(), session)
        ):
            return "token"
        return None

    # -- CSRF ----------------------------------------------------------------------------

    @staticmethod
    def csrf_token(request: Request) -> str:
        """The request's CSRF token: its cookie's, or a new one (set by the response)."""
        existing = request.cookies.get(CSRF_COOKIE)
        if existing and len(existing) >= 32:
            return existing
        token: str | None = getattr(request.state, "new_csrf", None)
        if token is None:
            token = secrets.token_urlsafe(32)
            request.state.new_csrf = token
        return token

    @staticmethod
    def csrf_ok(request: Request, submitted: str | None) -> bool:
        cookie = request.cookies.get(CSRF_COOKIE)
        if not cookie or not submitted:
            return False
        if not hmac.compare_digest(cookie.encode(), submitted.encode()):
            return False
        origin = request.headers.get("origin")
        if origin and origin != "null":
            host = request.headers.get("host", "")
            if urlsplit(origin).netloc != host:
                return False
        return True
