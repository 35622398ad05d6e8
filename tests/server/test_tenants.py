"""Per-tenant API keys (server/tenants.py) over HTTP, on the fake engine: which key is
which tenant (and what reaches the scheduler), adapter access lists, max_concurrent and
tokens_per_min (429 + Retry-After, slots given back however a request ends), and the
`priority` field's contract. The scheduler side is tests/engine/test_scheduler_policy.py."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from bastion.config import ApiKeyConfig, ServerConfig
from bastion.server import build_app
from bastion.server.served_models import ServedModel
from bastion.server.tenants import Tenants
from tests.support.fake_adapters import FakeLoraEngine
from tests.support.fake_engine import FakeEngine
from tests.support.servers import ServerThread

ALICE = ApiKeyConfig(name="alice", key="sk-alice-123", max_concurrent=2, adapters=("sql",))
BOB = ApiKeyConfig(name="bob", key="sk-bob-4567", tokens_per_min=40, weight=2.0)
CAROL = ApiKeyConfig(name="carol", key="sk-carol-89")  # no limits, every adapter
KEYS = (ALICE, BOB, CAROL)


def auth(key: ApiKeyConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {key.key}"}


def chat(model: str = "fake-model", text: str = "hi", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}


@pytest.fixture
def tenant_server():
    engine = FakeLoraEngine()
    engine.loaded.update({"sql": "/x/sql", "poem": "/x/poem"})
    extra = [ServedModel(id=name, engine=engine.with_adapter(name), parent=engine.model_name, vetting="pass")
             for name in ("sql", "poem")]
    app = build_app(engine, ServerConfig(api_keys=KEYS), extra_models=extra)
    handle = ServerThread.start(engine, app=app)
    yield handle
    handle.stop()


def test_each_key_is_its_tenant_down_to_the_scheduler(tenant_server):
    url = tenant_server.base_url
    for key in KEYS:
        r = httpx.post(f"{url}/v1/chat/completions", json=chat(), headers=auth(key))
        assert r.status_code == 200, r.text
    seen = tenant_server.engine.submitted
    assert [s.tenant for _, s, _ in seen] == ["alice", "bob", "carol"]
    assert [s.weight for _, s, _ in seen] == [1.0, 2.0, 1.0]
    # tenants never share prefix-cache blocks (time-to-first-token would leak prompts)
    assert len({salt for _, _, salt in seen}) == 3 and all(salt for _, _, salt in seen)
    r = httpx.post(f"{url}/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer sk-nobody-00"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_a_key_sees_and_uses_only_its_adapters(tenant_server):
    url = tenant_server.base_url
    ids = {m["id"] for m in httpx.get(f"{url}/v1/models", headers=auth(ALICE)).json()["data"]}
    assert ids == {"fake-model", "sql"}
    assert {m["id"] for m in httpx.get(f"{url}/v1/models", headers=auth(CAROL)).json()["data"]} == {
        "fake-model", "sql", "poem"}
    r = httpx.post(f"{url}/v1/chat/completions", json=chat("poem"), headers=auth(ALICE))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "poem" not in r.json()["error"]["message"].split("Served models:")[1]  # not even named
    assert httpx.get(f"{url}/v1/models/poem", headers=auth(ALICE)).status_code == 404
    assert httpx.post(f"{url}/v1/completions", json={"model": "poem", "prompt": "x", "max_tokens": 2},
                      headers=auth(ALICE)).status_code == 404
    r = httpx.post(f"{url}/v1/chat/completions", json=chat("sql"), headers=auth(ALICE))
    assert r.status_code == 200 and tenant_server.engine.served_by[-1] == "sql"
    assert httpx.post(f"{url}/v1/chat/completions", json=chat("poem"), headers=auth(CAROL)).status_code == 200


def test_max_concurrent_answers_429_and_frees_slots_however_requests_end(tenant_server):
    url = tenant_server.base_url
    tenant_server.engine.token_delay_s = 0.05

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            body = chat(max_tokens=20, stream=True)
            streams = [client.stream("POST", "/v1/chat/completions", json=body, headers=auth(ALICE))
                       for _ in range(2)]
            opened = [await s.__aenter__() for s in streams]
            assert [r.status_code for r in opened] == [200, 200]
            third = await client.post("/v1/chat/completions", json=chat(), headers=auth(ALICE))
            assert third.status_code == 429 and third.json()["error"]["code"] == "rate_limit_exceeded"
            assert third.headers["retry-after"] == "1"
            # another tenant is not held back by alice's limit
            assert (await client.post("/v1/chat/completions", json=chat(), headers=auth(CAROL))).status_code == 200
            await opened[0].aread()  # one finishes ...
            await streams[1].__aexit__(None, None, None)  # ... one is dropped mid-stream
            await streams[0].__aexit__(None, None, None)
            for _ in range(50):  # the dropped stream's slot comes back once the server sees it go
                r = await client.post("/v1/chat/completions", json=chat(), headers=auth(ALICE))
                if r.status_code == 200:
                    break
                await asyncio.sleep(0.05)
            assert r.status_code == 200
            two = await asyncio.gather(*(client.post("/v1/chat/completions", json=chat(), headers=auth(ALICE))
                                         for _ in range(2)))
            assert [x.status_code for x in two] == [200, 200]  # both slots free again

    asyncio.run(run())


def test_tokens_per_min_answers_429_with_retry_after(tenant_server):
    url = tenant_server.base_url
    # the fake engine's tokenizer is bytes (+ BOS): 20 characters are 21 prompt tokens
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x" * 20, "max_tokens": 5}, headers=auth(BOB))
    assert r.status_code == 200
    assert r.json()["usage"]["total_tokens"] == 26  # charged: 21 prompt now, 5 generated at the end
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "y" * 20, "max_tokens": 5}, headers=auth(BOB))
    assert r.status_code == 429 and r.json()["error"]["type"] == "tokens"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "y" * 10, "max_tokens": 5}, headers=auth(BOB))
    assert r.status_code == 200  # 25 + 10 prompt tokens fit in 40 (generated tokens count after)


def test_token_window_slides():
    tenants = Tenants(ServerConfig(api_keys=(BOB,)), None)
    bob = tenants.identify(BOB.key)
    lease = tenants.admit(bob, 30, now=100.0)
    lease.close_one(5)
    with pytest.raises(Exception) as e:
        tenants.admit(bob, 10, now=130.0)
    assert e.value.status == 429
    # the 30 prompt tokens charged at t=100 leave the window at t=160
    tenants.admit(bob, 10, now=time.monotonic() + 61).close_one(0)


def test_priority_is_refused_unless_the_server_schedules_by_it():
    engine = FakeEngine()
    handle = ServerThread.start(engine, ServerConfig())
    try:
        r = httpx.post(f"{handle.base_url}/v1/chat/completions", json=chat(priority=3))
        assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
        assert httpx.post(f"{handle.base_url}/v1/chat/completions", json=chat(priority=0)).status_code == 200
        engine.scheduling_policy = "priority"
        r = httpx.post(f"{handle.base_url}/v1/completions", json={"prompt": "x", "max_tokens": 2, "priority": -7})
        assert r.status_code == 200
        assert engine.submitted[-1][1].priority == -7
        r = httpx.post(f"{handle.base_url}/v1/completions", json={"prompt": "x", "max_tokens": 2, "priority": "1"})
        assert r.status_code == 400  # strict: no string coercion
    finally:
        handle.stop()


def test_without_keys_the_user_field_names_the_tenant():
    engine = FakeEngine()
    handle = ServerThread.start(engine, ServerConfig())
    try:
        httpx.post(f"{handle.base_url}/v1/chat/completions", json=chat(user="team-a"))
        httpx.post(f"{handle.base_url}/v1/chat/completions", json=chat())
        assert [s.tenant for _, s, _ in engine.submitted] == ["user:team-a", ""]
    finally:
        handle.stop()


def test_lone_api_key_is_the_default_tenant():
    engine = FakeEngine()
    app = build_app(engine, ServerConfig(api_key="k3y-k3y-k3y"))
    handle = ServerThread.start(engine, app=app)
    try:
        r = httpx.post(f"{handle.base_url}/v1/chat/completions", json=chat(user="spoof"),
                       headers={"Authorization": "Bearer k3y-k3y-k3y"})
        assert r.status_code == 200
        assert engine.submitted[-1][1].tenant == "default"  # the key names the tenant, not the body
    finally:
        handle.stop()
