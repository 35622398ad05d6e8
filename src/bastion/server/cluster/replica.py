"""`BastionReplica`: one Ray Serve replica = one Bastion engine and its own FastAPI app.

Each replica builds what `bastion serve` builds in one process (the engine from the same
`Config`, the vetting gate, the serving policy, the `--lora` adapters, `build_app`), so a
request answered by a replica is answered exactly as the single server would: same
routes, auth, limits, guards and error bodies. The front hands it requests as plain data
(messages.py) and `call_app` drives the app in-process as an ASGI server would, streaming
the response back through Ray.

Per replica: the engine, its KV cache and prefix cache, the adapters it loaded, its
Prometheus registry. Nothing is shared between replicas; the front fans adapter loads and
/metrics out to all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from bastion.config import Config
from bastion.server.app import build_app, engine_problem
from bastion.server.cluster.messages import ForwardedRequest, Head, NotThisReplica

log = logging.getLogger("bastion.cluster")

# (config, served model name) -> the vetting gate or None: cli.serve_gate, handed in by
# the caller so that this layer does not import the CLI (it travels to the replicas by
# reference: they import it there).
GateFactory = Callable[[Config, str], Any]


class BastionReplica:
    """The deployment's class (launch.py wraps it with `serve.deployment` options)."""

    def __init__(self, config: Config, gate_factory: GateFactory | None = None) -> None:
        from ray import serve

        from bastion.server.adapter_loads import vet_at_start
        from bastion.serving.async_engine import AsyncEngine
        from bastion.serving.policy import ServingPolicy

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._config = config
        self.engine = AsyncEngine.from_config(config, show_progress=False)
        gate = gate_factory(config, self.engine.model_name) if gate_factory is not None else None
        if gate is not None:
            self.engine.engine.enable_adapters(config.adapters)
        policy = ServingPolicy.from_config(config, gate)
        pending = vet_at_start(policy, self.engine, config.adapters.loras)
        self.app = build_app(self.engine, config.server, policy=policy, pending_adapters=pending)
        log.info("replica %s serving %r", self.replica_id, self.engine.model_name)

    async def serve_http(self, request: ForwardedRequest, *, route_key: str | None = None,
                         avoid: tuple[str, ...] = (), replica: str | None = None) -> AsyncIterator[Any]:
        """The stream messages.py describes. `route_key`/`avoid`/`replica` are for the
        router (router.py), which reads them from the call; `replica` is checked here too,
        because a call pinned to a replica that is gone lands on another one."""
        if replica is not None and replica != self.replica_id:
            raise NotThisReplica(f"{self.replica_id} is not {replica}")
        yield self.replica_id
        async for item in call_app(self.app, request):
            yield item

    async def check_health(self) -> None:
        """Ray Serve's health check: a dead engine loop or a wedged step fails it, and Serve
        replaces the replica (its in-flight streams end; the front reports that)."""
        problem = engine_problem(self.engine, self._config.server)
        if problem is not None:
            raise RuntimeError(f"replica {self.replica_id}: {problem}")

    def __del__(self) -> None:
        # Serve calls this once the replica is out of routing and its requests drained (or
        # graceful_shutdown_timeout_s passed). A request that still reaches the app gets 503.
        state = getattr(getattr(self, "app", None), "state", None)
        if state is not None:
            state.bastion.draining = True
            state.bastion.adapter_loads.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


_END = object()  # the app returned


async def call_app(app: Any, request: ForwardedRequest) -> AsyncIterator[Head | bytes]:
    """Run one HTTP request through the ASGI `app` in this event loop: yields the `Head`,
    then body chunks (those already queued are coalesced into one). The body is received
    at once; the app sees a disconnect when the caller closes this generator (a client
    gone at the front), and is cancelled then, which aborts its engine request."""
    out: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        out.put_nowait(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": request.method, "scheme": "http", "path": request.path,
        "raw_path": request.path.encode("latin-1", "replace"), "query_string": request.query, "root_path": "",
        "headers": list(request.headers), "client": request.client, "server": ("bastion-replica", 0),
        "state": {},
    }
    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: out.put_nowait(_END))
    started = False
    try:
        message = await out.get()
        while message is not _END:
            if message["type"] == "http.response.start":
                started = True
                yield Head(int(message["status"]), tuple((bytes(k), bytes(v)) for k, v in message.get("headers", ())))
                message = await out.get()
                continue
            if message["type"] != "http.response.body":
                message = await out.get()
                continue
            chunks, more = [message.get("body", b"")], message.get("more_body", False)
            message = None
            while more and not out.empty():  # coalesce what the app already produced
                message = out.get_nowait()
                if message is _END or message["type"] != "http.response.body":
                    break
                chunks.append(message.get("body", b""))
                more, message = message.get("more_body", False), None
            body = b"".join(chunks)
            if body:
                yield body
            if not more:
                return
            message = message if message is not None else await out.get()
        if not started:  # CatchAllMiddleware answers every failure, so this is a bug
            log.error("the app returned without a response")
            yield Head(500, ((b"content-type", b"application/json"),))
            yield (b'{"error": {"message": "Internal server error.", "type": "server_error", '
                   b'"param": null, "code": "internal_error"}}')
    finally:
        gone.set()
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            await task
