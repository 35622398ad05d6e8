"""API keys (401s) and the Prometheus endpoint."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from bastion.config import ServerConfig
from bastion.server import build_app
from bastion.server.auth import API_KEY_ENV

from tests.support.servers import ServerThread, wait_until
from tests.support.fake_engine import FakeEngine

KEY = "sk-test-key"
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[ServerThread]:
    handle = ServerThread.start(FakeEngine(), ServerConfig(api_key=KEY))
    yield handle
    handle.stop()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
def test_missing_or_wrong_key_is_401(keyed_server: ServerThread, headers: dict[str, str]) -> None:
    with keyed_server.http() as http:
        for method, path in [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/metrics")]:
            r = http.request(method, path, headers=headers, json={"messages": MSG})
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
        assert http.get("/health").status_code == 200  # probes need no key


def test_auth_is_checked_before_the_body(keyed_server: ServerThread) -> None:
    with keyed_server.http() as http:
        r = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401


def test_right_key_works_with_openai_client(keyed_server: ServerThread) -> None:
    r = keyed_server.openai(api_key=KEY).chat.completions.create(model=keyed_server.model, messages=MSG,
                                                                 max_tokens=2)
    assert r.usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        keyed_server.openai(api_key="nope").models.list()


def test_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    handle = ServerThread.start(FakeEngine(), ServerConfig())
    try:
        with handle.http() as http:
            assert http.get("/v1/models").status_code == 401
            assert http.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200
    finally:
        handle.stop()


def test_no_key_configured_means_open(fake_server: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    with fake_server.http() as http:
        assert http.get("/v1/models").status_code == 200


# ----------------------------------------------------------------------- metrics


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_exposes_engine_and_latency_series(api_server: ServerThread) -> None:
    with api_server.http() as http:
        before = http.get("/metrics").text
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5, "temperature": 0,
                                               "ignore_eos": True})
        assert r.status_code == 200
        resp = http.get("/metrics")
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    for name in ("bastion_queue_depth", "bastion_running_requests", "bastion_kv_blocks_used",
                 "bastion_kv_blocks_free", "bastion_generation_tokens_per_second", "bastion_model_weight_bytes"):
        _metric(text, name)
    assert _metric(text, "bastion_generation_tokens_total") - _metric(before, "bastion_generation_tokens_total") == 5
    assert _metric(text, "bastion_prompt_tokens_total") > _metric(before, "bastion_prompt_tokens_total")
    ttft_count = "bastion_time_to_first_token_seconds_count"
    assert _metric(text, ttft_count) == _metric(before, ttft_count) + 1
    itl_count = "bastion_inter_token_latency_seconds_count"
    assert _metric(text, itl_count) == _metric(before, itl_count) + 4  # 5 tokens, 4 gaps
    assert _metric(text, "bastion_e2e_request_latency_seconds_count") >= 1
    assert _metric(text, "bastion_generation_tokens_per_second") > 0


def test_rejections_are_counted(fake_server: ServerThread) -> None:
    with fake_server.http() as http:
        http.post("/v1/chat/completions", json={"messages": MSG, "temperature": -1})
        text = http.get("/metrics").text
    assert _metric(text, 'bastion_requests_rejected_total{status="400"}') >= 1


def test_each_app_has_its_own_registry() -> None:
    a, b = build_app(FakeEngine()), build_app(FakeEngine())  # no "Duplicated timeseries"
    assert a.state.bastion.metrics.registry is not b.state.bastion.metrics.registry


def test_cancelled_requests_are_counted_separately(fake_server: ServerThread) -> None:
    fake_server.engine.token_delay_s = 0.02
    with fake_server.http() as http, http.stream("POST", "/v1/completions",
                                                 json={"prompt": "hi", "max_tokens": 200, "stream": True}) as r:
        next(r.iter_lines())
    with fake_server.http() as http:
        assert wait_until(lambda: 'finish_reason="cancelled"' in http.get("/metrics").text)
