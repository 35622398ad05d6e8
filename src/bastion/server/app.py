"""The FastAPI app and the uvicorn server around it.

Public entry points (what the CLI calls):
* `build_app(engine, server_config)` -> FastAPI app (no I/O; no thread but the
  adapter vetting thread, and that only once a behaviour scan is queued);
* `run_server(engine, server_config)` -> blocks serving until SIGINT/SIGTERM, then
  shuts down gracefully; `serve(...)` is the same as a coroutine;
* `make_server(...)` -> the `BastionServer` itself, for callers that bring their own
  sockets or loop (tests).

Graceful shutdown: on the signal, /health turns 503 and new requests get 503, the
listening socket closes, and `engine.shutdown(grace_s)` runs *while* uvicorn waits for
open connections. In-flight requests finish within the grace period or are aborted by
the engine; aborted streams end with finish_reason "abort" and [DONE], aborted
non-streaming requests get a 503. No request is left hanging.

Engine failure: /health answers 503 while the engine loop is dead or one step has run
longer than `ServerConfig.engine_stall_s`; a dead engine loop also stops the server,
and `run_server` then raises `EngineDeadError`, so `bastion serve` exits non-zero and a
supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import JSONResponse, Response

from bastion.config import ServerConfig
from bastion.engine.outputs import EngineDeadError
from bastion.server import routes_admin, routes_chat, routes_completions, web_page
from bastion.server.adapter_loads import AdapterLoads
from bastion.server.auth import OPEN_PATHS, ApiKeyMiddleware, resolve_api_key
from bastion.server.bind import bind_socket
from bastion.server.errors import CatchAllMiddleware, install_error_handlers
from bastion.server.limits import BodyLimitMiddleware
from bastion.server.metrics import ServerMetrics
from bastion.server.protocol import ModelList
from bastion.server.served_models import ServedModel, ServedModels
from bastion.server.state import ServerState, get_state
from bastion.server.tenants import Tenants
from bastion.serving.policy import ServingPolicy

logger = logging.getLogger("bastion.server")


def build_app(engine: Any, server_config: ServerConfig | None = None, *, policy: ServingPolicy | None = None,
              extra_models: Iterable[ServedModel] = (),
              pending_adapters: Iterable[tuple[str, str, Any]] = ()) -> FastAPI:
    """The OpenAI-compatible app serving `engine` under the id `engine.model_name`, its
    requests and adapter loads under `policy` (default: no gate, no guard, no CleanGen
    unless a request asks). The app drives the engine but does not own it: shutting the
    engine down is the job of whoever runs the server (`run_server` does).

    `pending_adapters`: (name, path, static report) of start-up adapters whose behaviour
    scan is still to run: listed as pending, scanned by the vetting thread (started here,
    the only thread this starts) and served when they pass (server/adapter_loads.py)."""
    config = server_config or ServerConfig()
    policy = policy or ServingPolicy()
    models = ServedModels(ServedModel(id=engine.model_name, engine=engine))
    for extra in extra_models:
        models.add(extra)
    loads = AdapterLoads(engine, models, policy)
    reports = getattr(policy.gate, "reports", {})  # the gate keeps the report of every adapter it vetted
    for name in getattr(engine, "adapter_names", list)():  # adapters loaded at start-up
        report = reports.get(name)
        loads.served(name, getattr(report, "path", None), report)
    for name, path, report in pending_adapters:
        loads.enqueue(name, path, report)
    tenants = Tenants(config, resolve_api_key(config.api_key))
    state = ServerState(config=config, models=models, metrics=ServerMetrics(engine), policy=policy,
                        adapter_loads=loads, tenants=tenants)

    # No /docs; /openapi.json only with --openapi (fuzzers, client generators): a private
    # inference server has no reason to publish its schema to whoever can reach the port.
    app = FastAPI(title="Bastion", docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json" if config.openapi else None)
    app.state.bastion = state
    install_error_handlers(app)
    app.include_router(routes_chat.router)
    app.include_router(routes_completions.router)
    app.include_router(routes_admin.router)
    _add_info_routes(app)
    if config.web:
        app.include_router(web_page.router)

    # add_middleware wraps: the last added runs first. Order on the way in:
    # catch-all (so even auth failures of ours become JSON) -> API key -> body limit -> routes.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    if tenants.keyed:  # the page itself is public (it holds no data); the API calls it makes need the key
        app.add_middleware(ApiKeyMiddleware, tenants=tenants,
                           open_paths=OPEN_PATHS | (web_page.PATHS if config.web else frozenset()))
    app.add_middleware(CatchAllMiddleware, log_requests=config.log_requests)
    return app


def _add_info_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> Response:
        state = get_state(request)
        if state.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        problem = engine_problem(state.models.resolve(None).engine, state.config)
        if problem is not None:
            return JSONResponse({"status": "unhealthy", "reason": problem}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        state = get_state(request)
        cards = [m.card() for m in state.models.all(state.visible_to(state.tenant(request)))]
        return Response(ModelList(data=cards).model_dump_json(), media_type="application/json")

    # `:path` because HF-style ids contain a slash ("HuggingFaceTB/SmolLM2-135M-Instruct").
    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> Response:
        state = get_state(request)
        card = state.models.lookup(model_id, state.visible_to(state.tenant(request))).card()
        return Response(card.model_dump_json(), media_type="application/json")

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


def engine_problem(engine: Any, config: ServerConfig) -> str | None:
    """Why the engine cannot serve (dead loop, wedged step), or None."""
    health = getattr(engine, "health", None)
    return health(config.engine_stall_s) if health is not None else None


class BastionServer(uvicorn.Server):
    """uvicorn.Server whose shutdown also drains the engine, and which stops when the
    engine loop dies (see module docstring)."""

    def __init__(self, config: uvicorn.Config, *, state: ServerState, engine: Any, grace_s: float) -> None:
        super().__init__(config)
        self._state = state
        self._engine = engine
        self._grace_s = grace_s

    async def on_tick(self, counter: int) -> bool:
        should_exit = await super().on_tick(counter)
        failure = getattr(self._engine, "failure", None)
        if failure is not None and not should_exit:
            logger.critical("the engine loop died (%s): stopping the server", type(failure).__name__)
            return True
        return should_exit

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._state.draining = True
        self._state.adapter_loads.close()  # no new scans
        # Concurrently with uvicorn's wait for open connections: the engine finishing
        # or aborting in-flight requests is what lets those connections close.
        engine_done = asyncio.ensure_future(self._engine.shutdown(self._grace_s))
        try:
            await super().shutdown(sockets)
        finally:
            try:
                await engine_done
            except Exception:  # noqa: BLE001 - shutting down anyway; say why it was unclean
                logger.exception("engine shutdown failed")
        # uvicorn re-raises the captured SIGINT/SIGTERM once serve() returns, which
        # kills the process (or raises KeyboardInterrupt) before the caller can finish
        # up. The shutdown was graceful, so run_server() simply returns instead.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()


def make_server(engine: Any, server_config: ServerConfig | None = None, *, app: FastAPI | None = None,
                policy: ServingPolicy | None = None, pending_adapters: Iterable[tuple[str, str, Any]] = (),
                **uvicorn_options: Any) -> BastionServer:
    """A BastionServer for `engine`; `uvicorn_options` override uvicorn.Config
    arguments (log_level, log_config, access_log, ...); `pending_adapters`: build_app's."""
    config = server_config or ServerConfig()
    app = app if app is not None else build_app(engine, config, policy=policy, pending_adapters=pending_adapters)
    options: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "access_log": True,  # method, path and status only: no prompt ever appears there
        "lifespan": "off",
        # A backstop only: the engine aborts what is left after grace_s, which ends
        # every stream; uvicorn cancels whatever still hangs a little later.
        "timeout_graceful_shutdown": int(config.shutdown_grace_s) + 5,
    }
    options.update(uvicorn_options)
    return BastionServer(uvicorn.Config(app, **options), state=app.state.bastion, engine=engine,
                         grace_s=config.shutdown_grace_s)


async def serve(engine: Any, server_config: ServerConfig | None = None, **kwargs: Any) -> None:
    await make_server(engine, server_config, **kwargs).serve()


def run_server(engine: Any, server_config: ServerConfig | None = None, *,
               sockets: list[socket.socket] | None = None, **kwargs: Any) -> ServerState:
    """Serve until SIGINT/SIGTERM, shut down gracefully (engine included), then return
    the server's state (its adapter loads: is a behaviour scan still running?).

    `sockets`: already bound listening sockets (`bastion serve` binds before loading the
    model, see bind.py); without them the configured host/port is bound here, so a taken
    port raises BindError in the caller's thread instead of ending uvicorn's.

    An engine with `run_loop` that is not yet running (AsyncEngine(background=False))
    gets the main thread and uvicorn a secondary one (see async_engine's NOTE on why);
    the main thread turns SIGINT/SIGTERM into uvicorn's graceful exit. If the HTTP
    server stops without having started, the engine loop is stopped too (nothing else
    would stop it) and ServerStartError is raised."""
    config = server_config or ServerConfig()
    if sockets is None:
        sockets = [bind_socket(config.host, config.port)]
    server = make_server(engine, config, **kwargs)
    try:
        _run(server, engine, config, sockets)
    finally:
        server._state.adapter_loads.close()
    return server._state


def _run(server: BastionServer, engine: Any, config: ServerConfig, sockets: list[socket.socket]) -> None:
    if not hasattr(engine, "run_loop") or engine.is_running and engine._thread.is_alive():
        server.run(sockets=sockets)
        _raise_if_failed(engine)
        return
    import signal
    import threading

    def _serve_http() -> None:
        try:
            server.run(sockets=sockets)
        except BaseException:  # noqa: BLE001 - e.g. uvicorn's sys.exit(1) on a failed startup
            logger.exception("the HTTP server failed")
        finally:  # after a graceful shutdown the loop is stopped already; else stop it now
            stop = getattr(engine, "stop", None)
            if stop is not None:
                stop()

    http = threading.Thread(target=_serve_http, name="bastion-http", daemon=True)

    def _exit(signum, frame):  # the server's shutdown drains and stops the engine loop
        server.should_exit = True

    previous = {s: signal.signal(s, _exit) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        engine.run_loop()  # returns once the server's shutdown (or its failure) stopped the engine
    finally:
        server.should_exit = True
        http.join(timeout=engine_grace(config) + 10)
        for s, h in previous.items():
            signal.signal(s, h)
    _raise_if_failed(engine)
    if not server.started:
        raise ServerStartError(f"the HTTP server did not start on {config.host}:{config.port} (see the log above)")


class ServerStartError(OSError):
    """uvicorn stopped before it served (the log says why)."""


def _raise_if_failed(engine: Any) -> None:
    failure = getattr(engine, "failure", None)
    if failure is not None:
        raise EngineDeadError(f"the engine loop crashed ({type(failure).__name__}: {failure}); see the log above")


def engine_grace(config: ServerConfig | None) -> float:
    return (config or ServerConfig()).shutdown_grace_s
