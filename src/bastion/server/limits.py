"""Request body size limit, enforced before the body is read.

A declared Content-Length above the limit is refused at once (413, nothing read); a
chunked body is counted as it arrives and refused the moment it crosses the limit.
FastAPI re-raises an HTTPException raised while it reads the body, so the error
handlers turn it into the usual OpenAI-style 413 body.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.server.errors import error_body


def _message(limit: int) -> str:
    return f"Request body is larger than the server's limit of {limit} bytes (bastion serve --max-body-mb)."


def too_large(limit: int) -> HTTPException:
    return HTTPException(413, _message(limit))


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            # refused before a byte of the body is read (uvicorn rejects a malformed header itself)
            body = error_body(_message(self.max_bytes), "invalid_request_error", None, "request_too_large")
            await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large(self.max_bytes)
            return message

        await self.app(scope, counting_receive, send)
