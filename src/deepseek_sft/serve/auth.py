"""Optional bearer-token authentication: on when the env var named by `serve.token_env` holds a token."""

from __future__ import annotations

import hmac
import os

from .errors import error_json

# Probes and the Prometheus scraper must work without the token.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def token_from_env(name: str, env=os.environ) -> str | None:
    """The bearer token from env var `name`; None (auth off) when unset or blank."""
    value = env.get(name, "").strip()
    return value or None


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if any."""
    for key, value in headers:
        if key.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class BearerAuthMiddleware:
    """Pure ASGI middleware: every path except PUBLIC_PATHS needs the bearer token (401 otherwise).

    The token is compared in constant time and never logged or echoed.
    """

    def __init__(self, app, token: str):
        self.app = app
        self._token = token.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        given = bearer_token(scope.get("headers", []))
        if given is None or not hmac.compare_digest(given.encode("utf-8"), self._token):
            message = "missing bearer token" if given is None else "invalid bearer token"
            response = error_json(
                401,
                f"{message}: send 'Authorization: Bearer <token>'",
                "invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
