"""Bastion on Ray Serve end to end, on loopback: a two-node Ray cluster (two `ray start`
processes, 1 CPU each), `bastion serve --replicas 2 --threads 1` joined to it (one
replica per node: each asks for its one CPU), the embedded model with a small KV budget.
At most 4 running requests per replica, so that under load most requests wait in an
engine's queue. One cluster for the module; the replica kill runs last (Serve then
restarts it)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest

pytest.importorskip("ray.serve")

from tests.support.ray_cluster import ClusterFront, LoopbackRay  # noqa: E402

KEY = "sk-cluster-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[LoopbackRay, ClusterFront]]:
    ray_nodes = LoopbackRay(cpus=1)
    front = None
    try:
        ray_nodes.start()
        front = ClusterFront.start(ray_nodes.address, ["--replicas", "2", "--threads", "1", "--kv-memory", "0.2",
                                                       "--max-num-seqs", "4", "--api-key", KEY],
                                   ray_nodes.temp)
        yield ray_nodes, front
    finally:
        if front is not None:
            front.stop()
        ray_nodes.stop()


@pytest.fixture(scope="module")
def driver(cluster):
    """This process as a Ray driver on the cluster (to find and kill a replica actor)."""
    import ray

    ray.init(address=cluster[0].address, namespace="bastion-tests", logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def _model(front: ClusterFront) -> str:
    return httpx.get(f"{front.base_url}/v1/models", headers=AUTH, timeout=30).json()["data"][0]["id"]


def _chat(system: str, user: str, model: str, **extra) -> dict:
    return {"model": model, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}], **extra}


def test_auth_health_and_metrics_hold_across_replicas(cluster):
    _, front = cluster
    with httpx.Client(base_url=front.base_url, timeout=30) as c:
        r = c.post("/v1/chat/completions", json=_chat("s", "hi", "m"))
        assert r.status_code == 401 and r.headers["x-bastion-replica"] not in ("", "none")
        assert c.post("/v1/chat/completions", json=_chat("s", "hi", "m"),
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/metrics").status_code == 401
        health = c.get("/health")
        assert health.status_code == 200 and health.json()["healthy"] == 2
        replicas = set(health.json()["replicas"])
        c.post("/v1/chat/completions", json=_chat("s", "hi", _model(front)), headers=AUTH).raise_for_status()
        metrics = c.get("/metrics", headers=AUTH)
        assert metrics.status_code == 200 and set(metrics.headers["x-bastion-replica"].split(",")) == replicas
        labelled = {line.split('replica="')[1].split('"')[0] for line in metrics.text.splitlines()
                    if line.startswith("bastion_") and 'replica="' in line}
        assert labelled == replicas and "bastion_cluster_retries_total" in metrics.text


def test_a_shared_prefix_stays_on_one_replica_and_hits_its_prefix_cache(cluster):
    _, front = cluster
    model = _model(front)
    system = "You answer questions about the Bastion server for its operators. " * 12  # > the 512-char key
    seen, cached = set(), []
    with httpx.Client(base_url=front.base_url, timeout=60, headers=AUTH) as c:
        for i in range(6):
            r = c.post("/v1/chat/completions", json=_chat(system, f"question {i}: what is a replica?", model))
            r.raise_for_status()
            seen.add(r.headers["x-bastion-replica"])
            cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
        assert len(seen) == 1, seen  # random routing would split 6 requests over 2 replicas (p = 31/32)
        assert all(n >= 96 for n in cached[1:]), cached  # the system prompt's KV is reused
        spread = set()
        for i in range(16):  # different prefixes spread (all on one replica: p = 2^-15)
            r = c.post("/v1/chat/completions", json=_chat(f"Prefix {i}. " * 60, "hi", model, max_tokens=1))
            r.raise_for_status()
            spread.add(r.headers["x-bastion-replica"])
            if len(spread) == 2:
                break
        assert len(spread) == 2, spread


def test_the_router_keeps_pins_and_keys_under_concurrency(driver):
    """Ray's routing tasks can strand a request (router.py): 300 concurrent keyed calls
    and 60 pinned ones, on a replica-echo deployment with our router, all land where
    they must and none waits forever."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from bastion.server.cluster.replica_set import live_replicas
    from bastion.server.cluster.router import AffinityRouter

    class Echo:
        def __init__(self) -> None:
            self.id = serve.get_replica_context().replica_id.unique_id

        async def call(self, x, **routing):
            yield self.id
            await asyncio.sleep(0.02)
            yield x

    options = {"name": "Echo", "num_replicas": 3, "ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 200,
               "request_router_config": RequestRouterConfig(request_router_class=AffinityRouter,
                                                            request_router_kwargs={"deployment": "Echo",
                                                                                   "slack": 10_000})}
    handle = serve.run(serve.deployment(Echo, **options).bind(), name="echo", route_prefix=None)
    call = handle.options(method_name="call", stream=True)

    async def one(**kw):
        return [x async for x in call.remote(0, **kw)][0]

    async def run():
        await one()
        ids = live_replicas("Echo")
        keyed = [one(route_key=f"k{i % 10}") for i in range(300)]
        pinned = [one(replica=ids[i % 3]) for i in range(60)]
        return ids, await asyncio.wait_for(asyncio.gather(*keyed, *pinned), 60)
    try:
        ids, got = asyncio.run(run())
    finally:
        serve.delete("echo")
    assert len(ids) == 3
    by_key = {k: {got[i] for i in range(k, 300, 10)} for k in range(10)}
    assert all(len(v) == 1 for v in by_key.values()), by_key
    assert got[300:] == [ids[i % 3] for i in range(60)]


async def _stream(client: httpx.AsyncClient, body: dict, record: dict) -> None:
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        record["status"], record["replica"] = r.status_code, r.headers.get("x-bastion-replica")
        record["headers_at"] = time.monotonic()
        text = ""
        async for chunk in r.aiter_text():
            text += chunk
        record["events"] = [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]


def test_a_killed_replica_loses_no_request_that_had_not_started(cluster, driver):
    _, front = cluster
    model = _model(front)
    records = [{} for _ in range(40)]

    async def load():
        async with httpx.AsyncClient(base_url=front.base_url, headers=AUTH, timeout=120) as client:
            tasks = [asyncio.create_task(_stream(client, _chat(f"Request {i} about topic {i * 7}. " * 4, "Go on.",
                                                               model, max_tokens=24, stream=True), rec))
                     for i, rec in enumerate(records)]
            while sum("headers_at" in r for r in records) < 6:  # under load: streams running on both
                await asyncio.sleep(0.05)
            victim = next(r["replica"] for r in records if "headers_at" in r)
            actor = driver.get_actor(f"SERVE_REPLICA::bastion#BastionReplica#{victim}", namespace="serve")
            killed_at = time.monotonic()
            driver.kill(actor, no_restart=True)
            await asyncio.wait_for(asyncio.gather(*tasks), 150)
            return victim, killed_at

    victim, killed_at = asyncio.run(load())
    assert all(r["status"] == 200 for r in records), [r.get("status") for r in records]  # none lost
    assert all(r["events"] and r["events"][-1] == "[DONE]" for r in records)  # nothing hangs, every stream ends
    cut = [r for r in records if any('"error"' in e for e in r["events"])]
    for r in cut:  # only a stream already streaming from the victim may be cut, and cleanly
        assert r["replica"] == victim
        assert json.loads(next(e for e in r["events"] if '"error"' in e))["error"]["code"] == "replica_failed"
    assert len(cut) <= 4  # at most its running batch (--max-num-seqs 4)
    # ray.kill returns before the process is gone: a second later the victim is out of play
    late = [r for r in records if r["headers_at"] >= killed_at + 1.0]
    assert len(late) >= 10 and all(r["replica"] != victim for r in late)  # its queue went elsewhere
    finished = [r for r in records if r not in cut]
    assert all(json.loads(r["events"][-2])["choices"][0]["finish_reason"] in ("length", "stop") for r in finished)
