"""Every error leaves the server as an OpenAI-style body:
``{"error": {"message", "type", "param", "code"}}``.

Status codes (the contract clients and tests rely on):

* 400 ``invalid_request_error`` for every malformed request: unparsable JSON, wrong
  types, missing fields, out-of-range sampling values (temperature < 0, top_p outside
  (0, 1], max_tokens < 1 or > max_model_len, ...), unsupported features (n > 1).
  FastAPI's default for schema failures is 422; we deliberately answer 400 instead,
  because that is what OpenAI returns and what its clients map to BadRequestError.
* 401 bad or missing API key (auth.py), 404 unknown model or route, 405 wrong method,
* 413 prompt (+ max_tokens) does not fit the context window,
* 429 engine queue full, with a ``Retry-After`` header,
* 503 engine dead or server draining, 500 anything unexpected (including a request
  the engine failed alone: the others go on).

Unexpected exceptions are caught by `CatchAllMiddleware`, not by a Starlette
``Exception`` handler: Starlette re-raises after calling such a handler so that the
ASGI server logs the traceback, and uvicorn's log line would include ``str(exc)``,
which may quote a prompt. We log the exception type and stack only, never the message,
unless request logging was explicitly enabled.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.engine.outputs import (
    EngineDeadError,
    EngineError,
    PromptTooLongError,
    QueueFullError,
    RequestFailedError,
)
from bastion.serving.policy import RequestRejected

logger = logging.getLogger("bastion.server")

RETRY_AFTER_S = 1  # the queue drains at engine-step speed; a second is a fair first wait


class ClientDisconnected(Exception):
    """The client went away before its (non-streaming) answer was ready."""


class APIError(Exception):
    """An error answered to the client with `status` and an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def context_too_long(message: str, param: str | None = None) -> APIError:
    return APIError(413, message, param=param, code="context_length_exceeded")


def from_engine_error(exc: EngineError) -> APIError:
    """Map the engine's errors to HTTP (see engine/outputs.py)."""
    if isinstance(exc, QueueFullError):
        return APIError(
            429,
            "The server is at capacity (request queue full); retry shortly.",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if isinstance(exc, PromptTooLongError):
        return context_too_long(str(exc) or "Prompt plus max_tokens does not fit the model context.")
    if isinstance(exc, EngineDeadError):
        return unavailable("The inference engine is not running.")
    if isinstance(exc, RequestFailedError):  # this request alone; the details stay in the server log
        return APIError(500, "The engine failed while serving this request; other requests are unaffected.",
                        type="server_error", code="internal_error")
    return unavailable("The inference engine could not serve this request.")


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="service_unavailable")


def _validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """Human message and `param` from pydantic errors; never echoes the input value
    (it may be a prompt, and it is the client's own data anyway)."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        detail = ctx.get("error", "invalid JSON")
        return f"Malformed JSON body: {detail}", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if param is None:
        return f"Invalid request body: {msg}", None
    extra = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return f"Invalid value for '{param}': {msg}{extra}", param


def _count_rejection(request: Request, status: int) -> None:
    state = getattr(request.app.state, "bastion", None)  # duck-typed: state.py imports us
    if state is not None:
        state.metrics.requests_rejected.labels(status=str(status)).inc()


async def _api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    _count_rejection(request, exc.status)
    return exc.response()


async def _rejected_handler(request: Request, exc: Exception) -> JSONResponse:
    """What the serving policy refuses (e.g. cleangen on the base model): a 400 naming the field."""
    assert isinstance(exc, RequestRejected)
    return await _api_error_handler(request, bad_request(str(exc), param=exc.param))


async def _disconnected_handler(_: Request, exc: Exception) -> Response:
    # Nobody is listening; 499 (nginx's "client closed request") keeps access logs honest.
    return Response(status_code=499)


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    _count_rejection(request, 400)
    message, param = _validation_message(exc.errors())
    code = "invalid_json" if param is None and message.startswith("Malformed") else "invalid_value"
    return JSONResponse(error_body(message, "invalid_request_error", param, code), status_code=400)


async def _http_exception_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    codes = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    message, code = str(exc.detail), codes.get(exc.status_code)
    if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's "error parsing the body"
        message, code = "Malformed JSON body: it is not valid UTF-8.", "invalid_json"
    body = error_body(message, kind, None, code)
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    """Handlers for the errors we expect. The catch-all for the unexpected is
    `CatchAllMiddleware`, which the app adds as its outermost middleware."""
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(RequestRejected, _rejected_handler)
    app.add_exception_handler(ClientDisconnected, _disconnected_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)


def log_unexpected(exc: BaseException, where: str, *, log_requests: bool) -> None:
    """Log an unexpected exception. Without request logging, only the exception type and
    the stack (file, line, code) are written: the message may contain user text."""
    if log_requests:
        logger.error("unhandled error in %s", where, exc_info=exc)
        return
    stack = "".join(traceback.format_tb(exc.__traceback__))
    logger.error("unhandled %s in %s (message withheld; enable request logging to see it)\n%s",
                 type(exc).__name__, where, stack)


class CatchAllMiddleware:
    """Turns any exception a handler lets escape into a 500 OpenAI error body."""

    def __init__(self, app: ASGIApp, *, log_requests: bool) -> None:
        self.app = app
        self.log_requests = log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - this is the last line of defence
            log_unexpected(exc, f"{scope.get('method')} {scope.get('path')}", log_requests=self.log_requests)
            if started:
                return  # headers are out; the server closes the half-sent response
            body = json.dumps(error_body("Internal server error.", "server_error", None, "internal_error"))
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body.encode()})
