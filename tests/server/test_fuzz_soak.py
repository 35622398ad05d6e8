"""The robustness harness in the suite (issue 16): a bounded property-based fuzz of the
real engine's app from its own OpenAPI schema, and a short soak with poisoned requests.
Both hold the server to: no 5xx but the poisoned requests' own, it keeps answering, no
KV block leaks. The full-size runs are `bastion bench fuzz` / `bastion bench soak`."""

from __future__ import annotations

import asyncio

import pytest

from bastion.bench.faults import poison_sampler
from bastion.bench.fuzz import clamp, generate_cases, run_fuzz
from bastion.bench.soak import run_soak
from bastion.config import ServerConfig

from tests.support.servers import ServerThread, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def openapi_server(real_engine):
    handle = ServerThread.start(real_engine, ServerConfig(openapi=True, admin_key="adm"))
    yield handle
    handle.stop()


def test_schema_is_published_only_on_request(openapi_server, fake_server):
    with openapi_server.http() as http:
        schema = http.get("/openapi.json").json()
    chat = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert chat["top_k"]["anyOf"][0]["maximum"] >= 9.2e18  # bounds are in the schema (int64)
    with fake_server.http() as http:
        assert http.get("/openapi.json").status_code == 404


def test_fuzzing_the_real_engine_finds_no_5xx(openapi_server):
    with openapi_server.http() as http:
        schema = http.get("/openapi.json").json()
    cases = generate_cases(schema, 300, seed=16)
    assert {c["url"].split("/")[-1] for c in cases} >= {"completions", "load_lora_adapter", "health"}
    report = asyncio.run(run_fuzz(openapi_server.base_url, cases, headers={"X-Admin-Key": "adm"}))
    summary = report.summary()
    assert report.ok, summary
    assert summary["statuses"].get("200", 0) >= 20 and summary["statuses"].get("400", 0) >= 100, summary
    assert report.bystander_streams >= 1
    stats = openapi_server.engine.stats
    assert wait_until(lambda: stats().num_running == 0 and stats().kv_blocks_used == 0), stats()


def test_clamp_only_lowers_valid_counts():
    chat = {"method": "POST", "url": "/v1/chat/completions"}
    assert clamp({**chat, "json": {"max_tokens": 900}}, 8)["json"]["max_tokens"] == 8
    assert clamp({**chat, "json": {"max_tokens": 3}}, 8)["json"]["max_tokens"] == 3
    assert clamp({**chat, "json": {"max_tokens": "900"}}, 8)["json"]["max_tokens"] == "900"
    assert clamp({**chat, "json": {"max_tokens": 2**70}}, 8)["json"]["max_tokens"] == 2**70
    assert clamp({**chat, "json": {"messages": []}}, 8)["json"]["max_tokens"] == 8
    assert clamp({"method": "GET", "url": "/health"}, 8) == {"method": "GET", "url": "/health"}


def test_a_short_soak_with_poisoned_requests(real_server):
    engine = real_server.engine.engine
    poison_sampler(engine)
    try:
        report = asyncio.run(run_soak(real_server.base_url, requests=120, concurrency=16, seed=7))
    finally:
        engine.sampler = engine.sampler.inner
    summary = report.summary()
    assert summary["failures"] == 0, summary["failure_details"]
    assert summary["unexpected_5xx"] == 0
    assert summary["by_kind"]["poison"] >= 2 and summary["by_kind"]["invalid"] >= 10, summary["by_kind"]
    assert summary["kv_blocks_used_after_idle"] == 0 and summary["running_after_idle"] == 0
