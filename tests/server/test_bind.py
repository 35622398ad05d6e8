"""The listening socket (issue 23): bind errors name the flag to change, and an HTTP
server that fails to start also stops the engine loop on the main thread, so
`bastion serve` exits instead of hanging deaf to SIGTERM."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from bastion.config import ServerConfig
from bastion.server import run_server
from bastion.server.app import ServerStartError
from bastion.server.bind import BindError, bind_socket
from bastion.serving.async_engine import AsyncEngine


def test_bind_errors_name_the_flag():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BindError, match=rf"^port {port} is already in use \(--port\)$"):
            bind_socket("127.0.0.1", port)
    with pytest.raises(BindError, match="--host"):
        bind_socket("192.0.2.1", 0)  # TEST-NET-1: never this machine's
    sock = bind_socket("127.0.0.1", 0)
    assert sock.getsockname()[1] > 0
    sock.close()


def test_run_server_stops_the_engine_when_the_http_server_cannot_start(tiny_llm_engine, caplog):
    engine = AsyncEngine(tiny_llm_engine(), tokenizer=None, model_name="tiny", background=False)
    dead = socket.socket()
    dead.close()  # uvicorn fails to serve on it
    watchdog = threading.Timer(30, engine.stop)  # the old behaviour hung here forever
    watchdog.start()
    start = time.monotonic()
    try:
        with caplog.at_level(logging.ERROR, logger="bastion.server"), pytest.raises(ServerStartError):
            run_server(engine, ServerConfig(port=0), sockets=[dead], log_config=None)
    finally:
        watchdog.cancel()
    assert time.monotonic() - start < 10
    assert not engine.is_running
    assert "the HTTP server failed" in caplog.text
