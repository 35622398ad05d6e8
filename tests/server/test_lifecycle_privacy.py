"""Graceful shutdown through BastionServer, and the no-prompts-in-logs rule."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from bastion.config import ServerConfig
from bastion.server import build_app, make_server

from tests.support.servers import ServerThread, wait_until
from tests.support.fake_engine import FakeEngine

SECRET = "my-bank-pin-is-4242"


def _start_bastion_server(engine: FakeEngine, config: ServerConfig) -> ServerThread:
    app = build_app(engine, config)
    server = make_server(engine, config, app=app, log_config=None, access_log=False)
    return ServerThread.start(engine, config, server=server, app=app)


def _read_stream(handle: ServerThread, body: dict, out: list[dict], started: threading.Event) -> None:
    with handle.http() as http, http.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append({"done": True} if line == "data: [DONE]" else json.loads(line[6:]))
                started.set()


@pytest.mark.parametrize("grace_s,expect", [(0.3, "abort"), (5.0, "length")])
def test_shutdown_finishes_or_aborts_in_flight_streams(grace_s: float, expect: str) -> None:
    engine = FakeEngine()
    engine.token_delay_s = 0.01  # 100 tokens = ~1 s: longer than 0.3 s, shorter than 5 s
    handle = _start_bastion_server(engine, ServerConfig(shutdown_grace_s=grace_s))
    chunks: list[dict] = []
    started = threading.Event()
    reader = threading.Thread(target=_read_stream, args=(handle, {"prompt": "hi", "max_tokens": 100,
                                                                  "ignore_eos": True, "stream": True},
                                                         chunks, started))
    reader.start()
    assert started.wait(5)
    t0 = time.monotonic()
    handle.stop()  # what SIGTERM does: should_exit -> BastionServer.shutdown
    reader.join(10)
    assert not reader.is_alive() and not handle.thread.is_alive()
    assert engine.shutdown_calls == [grace_s]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
    assert finishes[-1] == expect and chunks[-1] == {"done": True}  # cleanly ended either way
    assert engine.stats().num_running == 0
    if expect == "abort":
        assert time.monotonic() - t0 < 3


def test_health_and_new_requests_get_503_while_draining(fake_server: ServerThread) -> None:
    state = fake_server.app.state.bastion
    state.draining = True
    try:
        with fake_server.http() as http:
            assert http.get("/health").status_code == 503
            r = http.post("/v1/completions", json={"prompt": "hi"})
            assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    finally:
        state.draining = False


def test_aborted_non_streaming_request_is_503(fake_server: ServerThread) -> None:
    fake_server.engine.token_delay_s = 0.02
    result: dict = {}

    def call() -> None:
        with fake_server.http() as http:
            result["r"] = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 200, "ignore_eos": True})

    t = threading.Thread(target=call)
    t.start()
    assert wait_until(lambda: fake_server.engine.stats().num_running == 1, timeout=5)
    rid = next(iter(fake_server.engine._running))
    fake_server.engine.abort(rid)
    t.join(10)
    assert result["r"].status_code == 503


# ------------------------------------------------------------------------ privacy


def _exercise(handle: ServerThread) -> None:
    with handle.http() as http:
        http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": SECRET}], "max_tokens": 3})
        http.post("/v1/completions", json={"prompt": SECRET, "max_tokens": 3, "stream": True})
        handle.engine.inject(RuntimeError(f"failed on {SECRET}"))
        assert http.post("/v1/completions", json={"prompt": SECRET}).status_code == 500


def test_prompts_and_outputs_are_not_logged_by_default(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    handle = ServerThread.start(FakeEngine(), ServerConfig())
    try:
        _exercise(handle)
    finally:
        handle.stop()
    assert "RuntimeError" in caplog.text  # the failure is logged...
    assert SECRET not in caplog.text  # ...without the message that quotes the prompt
    assert "I am a fake" not in caplog.text  # nor any output


def test_log_requests_flag_logs_them(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bastion.server")
    handle = ServerThread.start(FakeEngine(), ServerConfig(log_requests=True))
    try:
        _exercise(handle)
    finally:
        handle.stop()
    assert SECRET in caplog.text and "Hel" in caplog.text


def test_run_server_sigterm_ends_streams_cleanly(tmp_path) -> None:
    """The CLI path end to end: run_server in its own process, SIGTERM mid-stream."""
    with socket.socket() as s:  # a free port (tiny race with other processes; fine here)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "serve.py"
    script.write_text(
        "from bastion.config import ServerConfig\n"
        "from bastion.server import run_server\n"
        "from tests.support.fake_engine import FakeEngine\n"
        "e = FakeEngine(); e.token_delay_s = 0.02\n"
        f"run_server(e, ServerConfig(port={port}, shutdown_grace_s=0.5), log_level='warning')\n"
        "print('shutdown_calls', e.shutdown_calls, flush=True)\n")
    repo = str(Path(__file__).resolve().parents[2])  # where the `tests` package lives
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _up(base), timeout=30), "server did not come up"
        lines = []
        with httpx.Client(base_url=base, timeout=10) as http, http.stream(
                "POST", "/v1/completions",
                json={"prompt": "hi", "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if len(lines) == 3:
                        proc.send_signal(signal.SIGTERM)
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "abort"
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "shutdown_calls [0.5]" in out  # run_server returned
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
