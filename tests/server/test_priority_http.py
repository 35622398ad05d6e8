"""Priorities respected under load, end to end: the real model behind HTTP with
--scheduling-policy priority and two running slots, a queue of low-priority streams, then
one urgent request: it preempts a running low one and finishes before every low request
that was still queued, and the low ones all finish intact (greedy text equal to the
same prompt served alone). The scheduler's own tests are tests/engine/test_scheduler_policy.py."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.support.servers import ServerThread


@pytest.fixture(scope="module")
def priority_server():
    from bastion.config import CacheConfig, Config, ModelConfig, SchedulerConfig
    from bastion.serving.async_engine import AsyncEngine

    engine = AsyncEngine.from_config(
        Config(model=ModelConfig(max_model_len=512), cache=CacheConfig(num_blocks=64),
               scheduler=SchedulerConfig(max_num_seqs=2, policy="priority")), show_progress=False)
    handle = ServerThread.start(engine)
    yield handle
    handle.stop()
    asyncio.run(engine.shutdown(grace_s=0))


def body(text: str, priority: int, max_tokens: int) -> dict:
    return {"prompt": text, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "priority": priority}


def test_an_urgent_request_overtakes_the_queue(priority_server):
    url = priority_server.base_url
    texts = [f"Item {i}: the licence grants the right to" for i in range(6)]
    alone = httpx.post(f"{url}/v1/completions", json=body(texts[3], 9, 24), timeout=120).json()["choices"][0]["text"]
    done: dict[str, float] = {}
    answers: dict[str, str] = {}

    async def send(client, name, payload):
        r = await client.post("/v1/completions", json=payload)
        assert r.status_code == 200, r.text
        answers[name] = r.json()["choices"][0]["text"]
        done[name] = time.monotonic()

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            lows = [asyncio.create_task(send(client, f"low{i}", body(t, 9, 24))) for i, t in enumerate(texts)]
            await asyncio.sleep(0.3)  # two lows running, four queued
            await send(client, "urgent", body("Quick: the capital of France is", 0, 4))
            await asyncio.gather(*lows)

    asyncio.run(run())
    later = [name for name in done if name.startswith("low") and done[name] > done["urgent"]]
    assert len(later) >= 4, sorted(done, key=done.get)  # every low that had not started, at least
    assert answers["low3"] == alone  # preemption recomputes: the text is the same
