"""The front: the HTTP server `bastion serve --replicas N` listens with. It forwards every
request to a replica through the deployment's handle (the router picks which: router.py)
and answers a few paths itself by asking every replica (/health, /metrics, adapter loads).

Retries. Nothing reaches the client before the chosen replica has produced the response
head *and* its first token's event (a chat stream's role announcement is held back with
the head), or the whole body of a JSON answer. A failure before that — the actor died or is unreachable, the replica
raised, or it answered 503 (draining, engine dead) — sends the request to another replica
(`avoid` keeps the router off the ones it failed on), up to MAX_ATTEMPTS. So a replica
that dies loses no request that had not started streaming. After the first chunk, a
failure ends the response: a stream gets one OpenAI-style error event and `data: [DONE]`.

Bounds (nothing hangs): a request waits at most ROUTE_TIMEOUT_S to be routed (no replica
alive or all full: 503); beyond `capacity` requests in flight here the front answers 429
at once, as one engine's queue bound would; a client that goes away closes its replica
call, which aborts the engine request there.

Every response carries `x-bastion-replica`: the replica that answered (its Ray Serve
replica id, stable for the replica's life), the ids asked for a fan-out, or "none".

Per-key limits: a key's `max_concurrent` is counted here, across all replicas (each
replica also checks it, never seeing more than the front let through); its
`tokens_per_min` is counted by each replica on the tokens it served (the front does not
tokenize), so with N replicas a key can use up to N times its token rate.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from bastion.server.cluster.adapter_log import AdapterLog
from bastion.server.cluster.affinity import route_key
from bastion.server.cluster.messages import ForwardedRequest, Head
from bastion.server.cluster.metrics_merge import FrontMetrics, merge
from bastion.server.cluster.replica_set import live_replicas
from bastion.server.errors import APIError, error_body
from bastion.server.tenants import Tenants

log = logging.getLogger("bastion.cluster")

MAX_ATTEMPTS = 3
ROUTE_TIMEOUT_S = 30.0  # to be routed and started on a replica
FAN_OUT_TIMEOUT_S = 10.0  # one replica's /health, /metrics or adapter load answer
REPLICA_HEADER = "x-bastion-replica"
_HOP_BY_HOP = frozenset({b"connection", b"transfer-encoding", b"keep-alive"})
_ALL_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
FANNED_OUT = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


class _ClientGone(Exception):
    pass


class Front:
    """`call`: the handle's `serve_http` with stream=True (anything with `.remote(request,
    **routing kwargs)` returning an async iterator with `.cancel()`); `deployment`: the
    name live_replicas() knows the router by; `capacity`: requests in flight per replica
    before 429; `max_body_bytes`: the replicas' own body limit, applied here first."""

    def __init__(self, call: Any, deployment: str, *, capacity: int, max_body_bytes: int,
                 replicas: Callable[[str], tuple[str, ...]] = live_replicas, tenants: Tenants | None = None) -> None:
        self._call, self._deployment, self._replicas = call, deployment, replicas
        self._capacity, self._max_body = capacity, max_body_bytes
        self._tenants = tenants  # per-key max_concurrent, across replicas (None: no keys)
        self._in_flight = 0
        self.metrics = FrontMetrics()
        self.adapters = AdapterLog()

    def app(self) -> Starlette:
        routes = [Route("/health", self.health, methods=["GET"]), Route("/metrics", self.prometheus, methods=["GET"])]
        routes += [Route(p, self.fan_out, methods=["POST"]) for p in FANNED_OUT]
        routes.append(Route("/{path:path}", self.forward, methods=_ALL_METHODS))
        return Starlette(routes=routes)

    # ------------------------------------------------------------ forwarding
    async def forward(self, request: Request) -> Response:
        try:
            fwd = await self._read(request)
        except _TooLarge:
            return _error(413, f"Request body too large (limit {self._max_body} bytes).", "invalid_request_error",
                          "body_too_large")
        except ClientDisconnect:
            return Response(status_code=400)
        live = self._replicas(self._deployment)
        self.adapters.catch_up(live, self._ask)  # a replica new since the last adapter load gets it
        if self._in_flight >= self._capacity * max(1, len(live)):
            return _error(429, "The cluster's queues are full; retry later.", "rate_limit_exceeded", "queue_full",
                          extra={"retry-after": "1"})
        try:
            lease = self._admit(request)
        except APIError as e:
            return _error(e.status, e.message, e.type, e.code, extra=e.headers)
        self._in_flight += 1
        done = self._done_once(lease)
        try:
            response = await self._start(request, fwd, route_key(fwd.path, fwd.body), done)
        except BaseException:
            done()
            raise
        if not isinstance(response, _Relay):
            done()
        return response

    def _admit(self, request: Request) -> Any:
        """The key's concurrency lease (None: no keys, or a key the replica will refuse)."""
        if self._tenants is None or not self._tenants.keyed:
            return None
        tenant = self._tenants.from_authorization(request.headers.get("authorization") or "")
        return None if tenant is None else self._tenants.admit(tenant, 0)

    def _done_once(self, lease: Any = None) -> Callable[[], None]:
        called = False

        def done() -> None:
            nonlocal called
            if not called:
                called = True
                self._in_flight -= 1
                if lease is not None:
                    lease.close_one()
        return done

    async def _start(self, request: Request, fwd: ForwardedRequest, key: str | None,
                     done: Callable[[], None]) -> Response:
        avoid: list[str] = []
        gone = asyncio.ensure_future(request.receive())  # the body is read: next is the disconnect
        try:
            for attempt in range(MAX_ATTEMPTS):
                if attempt:
                    self.metrics.retries.inc()
                stream = self._call.remote(fwd, route_key=key, avoid=tuple(avoid))
                replica = None
                try:
                    replica = await _next(stream, gone, ROUTE_TIMEOUT_S)
                    head = await _next(stream, gone)
                    first = await _next(stream, gone, end=b"")
                    while first and _announces_only(first, head):  # wait for the first token
                        more = await _next(stream, gone, end=b"")
                        if not more:
                            break
                        first += more
                except _ClientGone:
                    stream.cancel()
                    return Response(status_code=499)
                except TimeoutError:
                    stream.cancel()
                    self.metrics.unrouted.inc()
                    return _error(503, "No replica took the request in time.", "server_error", "no_replica")
                except Exception as e:  # noqa: BLE001 - the replica failed before the first byte: go elsewhere
                    stream.cancel()
                    log.warning("replica %s failed before answering (%s): retrying elsewhere", replica or "?",
                                type(e).__name__)
                    if replica:
                        avoid.append(replica)
                    continue
                if not isinstance(head, Head):
                    stream.cancel()
                    continue
                if head.status == 503 and attempt + 1 < MAX_ATTEMPTS:
                    stream.cancel()
                    avoid.append(replica)
                    continue
                return _Relay(replica, head, first, stream, self._on_cut, done)
        finally:
            gone.cancel()
        self.metrics.unrouted.inc()
        return _error(503, "No replica could serve the request.", "server_error", "no_replica")

    def _on_cut(self) -> None:
        self.metrics.cut_streams.inc()

    async def _read(self, request: Request) -> ForwardedRequest:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self._max_body:
                raise _TooLarge
            chunks.append(chunk)
        client = request.client
        return ForwardedRequest(request.method, request.url.path, request.scope.get("query_string", b""),
                                tuple(request.scope["headers"]), b"".join(chunks),
                                (client.host, client.port) if client else None)

    # ------------------------------------------------------------ fan-out
    async def replica_ids(self) -> tuple[str, ...]:
        ids = self._replicas(self._deployment)
        if not ids:  # the router is made on the first call through the handle
            await self._ask(ForwardedRequest("GET", "/health", b"", (), b""), None)
            ids = self._replicas(self._deployment)
        return ids

    async def _ask(self, fwd: ForwardedRequest, replica: str | None) -> tuple[Head | None, bytes]:
        """One whole answer of `replica` (None: any), or (None, b"") if it failed."""
        stream = self._call.remote(fwd, replica=replica)

        async def collect() -> tuple[Head | None, bytes]:
            head, body = None, []
            async for item in stream:
                if isinstance(item, Head):
                    head = item
                elif isinstance(item, bytes):
                    body.append(item)
            return head, b"".join(body)
        try:
            return await asyncio.wait_for(collect(), FAN_OUT_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - a replica that cannot answer counts as failed
            stream.cancel()
            log.warning("replica %s did not answer %s (%s)", replica or "?", fwd.path, type(e).__name__)
            return None, b""

    async def _ask_all(self, fwd: ForwardedRequest) -> list[tuple[str, Head | None, bytes]]:
        ids = await self.replica_ids()
        answers = await asyncio.gather(*(self._ask(fwd, r) for r in ids))
        return [(r, head, body) for r, (head, body) in zip(ids, answers)]

    async def health(self, request: Request) -> Response:
        answers = await self._ask_all(ForwardedRequest("GET", "/health", b"", (), b""))
        states = {r: "ok" if head is not None and head.status == 200 else "unhealthy" for r, head, _ in answers}
        healthy = sum(s == "ok" for s in states.values())
        self.metrics.replicas.set(len(answers))
        body = {"status": "ok" if healthy else "unhealthy", "healthy": healthy, "replicas": states}
        return JSONResponse(body, status_code=200 if healthy else 503, headers={REPLICA_HEADER: _ids(states)})

    async def prometheus(self, request: Request) -> Response:
        fwd = await self._read(request)
        answers = await self._ask_all(fwd)
        for r, head, body in answers:  # the replicas' auth decides who may read metrics
            if head is not None and head.status in (401, 403):
                return _relay_whole(r, head, body)
        ok = [(r, body.decode("utf-8", "replace")) for r, head, body in answers if head is not None
              and head.status == 200]
        if not ok:
            return _error(503, "No replica answered.", "server_error", "no_replica")
        self.metrics.replicas.set(len(answers))
        text = merge(ok) + self.metrics.render().decode()
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8",
                        headers={REPLICA_HEADER: _ids(r for r, _ in ok)})

    async def fan_out(self, request: Request) -> Response:
        """Adapter load/unload on every replica (each vets and loads on its own). One
        answer when they agree; 502 naming each replica's status when they do not."""
        try:
            fwd = await self._read(request)
        except _TooLarge:
            return _error(413, "Request body too large.", "invalid_request_error", "body_too_large")
        answers = await self._ask_all(fwd)
        if not answers:
            return _error(503, "No replica is running.", "server_error", "no_replica")
        statuses = {r: head.status if head is not None else None for r, head, _ in answers}
        self.adapters.record(fwd, statuses, statuses.values())
        if len(set(statuses.values())) == 1 and answers[0][1] is not None:
            r, head, body = answers[0]
            return _relay_whole(_ids(statuses), head, body)
        detail = ", ".join(f"{r}: {s if s is not None else 'no answer'}" for r, s in statuses.items())
        return _error(502, f"The replicas answered differently ({detail}); GET /v1/lora_adapters on each, or retry.",
                      "server_error", "replicas_disagree", replica=_ids(statuses))


class _TooLarge(Exception):
    pass


async def _next(stream: Any, gone: asyncio.Future, timeout: float | None = None, end: Any = None) -> Any:
    """The stream's next item, racing the client's disconnect (and `timeout`); `end` when
    the stream is over (None: a stream that ends here is a failure)."""
    step = asyncio.ensure_future(stream.__anext__())
    done, _ = await asyncio.wait({step, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if step not in done:
        step.cancel()
        if gone in done:
            raise _ClientGone
        raise TimeoutError
    try:
        return step.result()
    except StopAsyncIteration:
        if end is None:
            raise ConnectionError("the replica ended the call without an answer") from None
        return end


def _announces_only(chunk: bytes, head: Head) -> bool:
    """True for a stream's opening that holds no token yet: chat streams open with an event
    announcing the role (empty content), sent before the request is even scheduled. The
    front holds such an opening back with the head, so a replica that fails while the
    request still waits in its queue is retried, not reported as a cut stream."""
    if not isinstance(head, Head) or not (head.header(b"content-type") or b"").startswith(b"text/event-stream"):
        return False
    for event in chunk.split(b"\n\n"):
        if not event.strip():
            continue
        if not event.startswith(b"data: {"):
            return False
        try:
            payload = json.loads(event[len(b"data: "):])
        except ValueError:
            return False
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if payload.get("usage") or not isinstance(choices, list) or not choices:
            return False
        for c in choices:
            delta = c.get("delta") if isinstance(c, dict) else None
            if not isinstance(delta, dict) or delta.get("content") or c.get("finish_reason") or c.get("logprobs"):
                return False
    return True


class _Relay(StreamingResponse):
    """The replica's response: its status and headers (+ ours), the first chunk already in
    hand, then the rest of its stream; a failure mid-way ends an event stream cleanly."""

    def __init__(self, replica: str, head: Head, first: bytes, stream: Any, on_cut: Callable[[], None],
                 done: Callable[[], None]) -> None:
        self._stream, self._on_cut, self._done = stream, on_cut, done
        self._sse = (head.header(b"content-type") or b"").startswith(b"text/event-stream")
        super().__init__(self._body(first), status_code=head.status)
        self.raw_headers = [(k, v) for k, v in head.headers if k not in _HOP_BY_HOP and k != REPLICA_HEADER.encode()]
        self.raw_headers.append((REPLICA_HEADER.encode(), replica.encode()))

    async def _body(self, first: bytes) -> AsyncIterator[bytes]:
        if first:
            yield first
        try:
            async for chunk in self._stream:
                if isinstance(chunk, bytes):
                    yield chunk
        except Exception as e:  # noqa: BLE001 - the replica died mid-answer: end it cleanly
            self._on_cut()
            log.warning("a replica failed mid-response (%s)", type(e).__name__)
            if self._sse:
                body = error_body("The replica serving this stream failed; the answer is incomplete.",
                                  "server_error", None, "replica_failed")
                yield f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # client gone or done: close the replica call now (aborts its engine request)
            self._stream.cancel()
            self._done()


def _relay_whole(replica: str, head: Head, body: bytes) -> Response:
    response = Response(body, status_code=head.status)
    response.raw_headers = [(k, v) for k, v in head.headers if k not in _HOP_BY_HOP and k != b"content-length"]
    response.raw_headers += [(b"content-length", str(len(body)).encode()), (REPLICA_HEADER.encode(), replica.encode())]
    return response


def _error(status: int, message: str, type: str, code: str, *, replica: str = "none",
           extra: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, None, code), status_code=status,
                        headers={REPLICA_HEADER: replica, **(extra or {})})


def _ids(replicas: Any) -> str:
    return ",".join(replicas) or "none"
