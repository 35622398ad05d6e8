"""A client that goes away has its request aborted at once and its KV blocks freed.

Portable (`api_server`): the assertion is on engine.stats(): no running request and
no KV block in use shortly after the client hangs up. With the FakeEngine we also
check the mechanism: the engine's generator was closed before it finished.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support.servers import ServerThread, is_fake, wait_until

LONG = {"temperature": 0.0, "ignore_eos": True}


def _long_max_tokens(srv: ServerThread) -> int:
    return srv.engine.max_model_len - 64  # leaves room for the prompt; long enough to cut off


def _slow_down(srv: ServerThread) -> None:
    if is_fake(srv):
        srv.engine.token_delay_s = 0.02  # 200 tokens = 4 s: the test hangs up long before


def _engine_idle(srv: ServerThread) -> bool:
    s = srv.engine.stats()
    return s.num_running == 0 and s.num_waiting == 0 and s.kv_blocks_used == 0


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell a long story."}]}),
    ("/v1/completions", {"prompt": "Once upon a time"}),
])
def test_stream_disconnect_aborts_and_frees_blocks(api_server: ServerThread, path: str, body: dict) -> None:
    _slow_down(api_server)
    payload = {**body, **LONG, "stream": True, "max_tokens": _long_max_tokens(api_server)}
    with api_server.http() as http, http.stream("POST", path, json=payload) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        for _ in range(3):  # a few tokens in: the request is certainly running
            next(line for line in lines if line.startswith("data: "))
        assert api_server.engine.stats().num_running >= 1
        # leaving the `with` closes the connection mid-stream
    assert wait_until(lambda: _engine_idle(api_server), timeout=5), api_server.engine.stats()
    if is_fake(api_server):
        assert first["id"] in api_server.engine.closed_early


def test_non_streaming_disconnect_aborts(api_server: ServerThread) -> None:
    _slow_down(api_server)
    payload = {"prompt": "Once upon a time", **LONG, "max_tokens": _long_max_tokens(api_server)}
    with api_server.http(timeout=0.3) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=payload)  # gives up and closes the connection
    assert wait_until(lambda: _engine_idle(api_server), timeout=5), api_server.engine.stats()
    if is_fake(api_server):
        assert any(rid.startswith("cmpl-") for rid in api_server.engine.closed_early)


def test_server_serves_normally_after_disconnects(api_server: ServerThread) -> None:
    with api_server.http() as http:
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
