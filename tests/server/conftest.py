"""Server test harness: real uvicorn servers on loopback, in background threads.

`api_server` is parametrized over backends: "fake" (FakeEngine, always) and "real"
(the session fixture `real_engine` from tests/conftest.py, when it exists; until then
those cases are skipped). Tests written against `api_server` must hold for any engine;
tests that need fault injection or exact output use `fake_server` directly.

The harness builds plain uvicorn servers around `build_app`, so stopping a test
server never shuts an engine down: engines belong to their fixtures.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from bastion.config import ServerConfig
from bastion.server import build_app
from bastion.server.auth import API_KEY_ENV
from .fake_engine import FakeEngine


@dataclass
class ServerThread:
    """A uvicorn server serving `app` on 127.0.0.1:<free port> in a daemon thread."""

    app: Any
    engine: Any
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None
    base_url: str = ""

    @classmethod
    def start(cls, engine: Any, config: ServerConfig | None = None, server: uvicorn.Server | None = None,
              app: Any = None) -> ServerThread:
        app = app if app is not None else build_app(engine, config or ServerConfig())
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))  # port 0: the OS picks a free port, no races between runs
        port = sock.getsockname()[1]
        # log_config=None: leave logging to pytest (caplog must see every record).
        server = server or uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
        handle = cls(app=app, engine=engine, server=server, base_url=f"http://127.0.0.1:{port}")
        handle.thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        handle.thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not handle.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return handle

    def stop(self) -> None:
        assert self.server is not None and self.thread is not None
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def model(self) -> str:
        return self.engine.model_name

    def openai(self, api_key: str = "unused", **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, **kw)

    def http(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=kw.pop("timeout", 30), **kw)


@pytest.fixture(scope="session", autouse=True)
def _no_ambient_api_key() -> Iterator[None]:
    """A developer's exported BASTION_API_KEY would put every test server behind a key."""
    saved = os.environ.pop(API_KEY_ENV, None)
    yield
    if saved is not None:
        os.environ[API_KEY_ENV] = saved


@pytest.fixture(scope="session")
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="session")
def fake_server(fake_engine: FakeEngine) -> Iterator[ServerThread]:
    handle = ServerThread.start(fake_engine)
    yield handle
    handle.stop()


@pytest.fixture(autouse=True)
def _reset_fake(fake_engine: FakeEngine) -> Iterator[None]:
    yield
    fake_engine.token_delay_s = 0.0
    fake_engine._injected.clear()
    fake_engine.revive()


@pytest.fixture(scope="session")
def real_server(request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    """One server for the whole session around `real_engine`: a second server would
    drive the same engine from a second event loop."""
    try:
        engine = request.getfixturevalue("real_engine")
    except pytest.FixtureLookupError:
        pytest.skip("no `real_engine` fixture (tests/conftest.py) yet")
    handle = ServerThread.start(engine)
    yield handle
    handle.stop()


@pytest.fixture(scope="session", params=["fake", pytest.param("real", marks=pytest.mark.slow)])
def api_server(request: pytest.FixtureRequest) -> ServerThread:
    return request.getfixturevalue("fake_server" if request.param == "fake" else "real_server")


def is_fake(handle: ServerThread) -> bool:
    return isinstance(handle.engine, FakeEngine)


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
