"""Server-sent events: the response class and the stream's framing.

`SSEResponse` exists for one guarantee: the body iterator is closed when the response
ends for any reason. Starlette cancels a streaming response when the client
disconnects, but if the cancellation lands while the body generator is parked at a
`yield` (the usual case: we were sending a chunk) nothing closes the generator until
garbage collection. Our generators close the engine request in their `finally`, so
closing them here is what makes "client disconnected -> request aborted, KV blocks
freed" happen at once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from bastion.server.errors import APIError, error_body, log_unexpected

DONE = "data: [DONE]\n\n"


def event(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[Any]] | None = None) -> None:
        # no-cache / no buffering: proxies must pass each token through as it comes.
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        # NOTE: a body generator that never started (the client left before the first
        # chunk) runs no `finally` when closed; `on_close` (Generation.aclose, idempotent)
        # is what still aborts its request and frees its tenant's slot then.
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose: Callable[[], Any] | None = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            if self._on_close is not None:
                await self._on_close()


def error_event(exc: BaseException, *, log_requests: bool) -> str:
    """An error after the 200 header went out can only be reported inside the stream
    (as vLLM and OpenAI do): one `data: {"error": ...}` event, then [DONE]."""
    if isinstance(exc, APIError):
        return event(exc.body())
    log_unexpected(exc, "stream", log_requests=log_requests)
    return event(error_body("Internal server error.", "server_error", None, "internal_error"))
