"""Real uvicorn servers on loopback in background threads, for the server tests (and the
robustness tests that drive them over HTTP)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import uvicorn

from bastion.config import ServerConfig
from bastion.server import build_app
from tests.support.fake_engine import FakeEngine


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
              app: Any = None, policy: Any = None) -> ServerThread:
        app = app if app is not None else build_app(engine, config or ServerConfig(), policy=policy)
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


def is_fake(handle: ServerThread) -> bool:
    return isinstance(handle.engine, FakeEngine)


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
