"""Optional Bearer API keys (one --api-key, or per-tenant keys from --api-keys FILE).

A pure ASGI middleware rather than a FastAPI dependency: dependencies run after
FastAPI has parsed the body, so an unauthenticated client would learn about JSON
errors (400) before being told it is not allowed in (401). Here the key is checked
first, for every path except the open ones (/health, for load balancers and probes;
the web page's static files, which hold no data and ask for the key themselves). The
key's tenant (server/tenants.py) goes into the request's state for the handlers.
"""

from __future__ import annotations

import json
import os

from starlette.types import ASGIApp, Receive, Scope, Send

from bastion.server.errors import error_body
from bastion.server.tenants import Tenants

API_KEY_ENV = "BASTION_API_KEY"
OPEN_PATHS = frozenset({"/health"})


def resolve_api_key(configured: str | None) -> str | None:
    """The key in force: the config's, else $BASTION_API_KEY, else None (no auth)."""
    key = configured if configured else os.environ.get(API_KEY_ENV) or None
    return key


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, *, tenants: Tenants, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app = app
        self._tenants = tenants
        self._open = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self._open or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
                break
        # digests in a dict (Tenants.identify): the time taken must not reveal how much of a key matched
        tenant = self._tenants.from_authorization(given)
        if tenant is not None:
            scope.setdefault("state", {})["tenant"] = tenant
            await self.app(scope, receive, send)
            return
        message = "Missing API key." if not given else "Incorrect API key provided."
        body = json.dumps(error_body(message, "invalid_request_error", None, "invalid_api_key")).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
