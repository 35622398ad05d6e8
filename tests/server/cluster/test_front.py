"""The front's retry, cut-stream, fan-out and bound rules (server/cluster/front.py) against
a scripted stand-in for the deployment handle: no Ray, every failure placed exactly."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from bastion.server.cluster.front import Front
from bastion.server.cluster.messages import Head

SSE = Head(200, ((b"content-type", b"text/event-stream"),))
JSON = Head(200, ((b"content-type", b"application/json"), (b"content-length", b"11")))
CHAT = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


class ReplicaDied(Exception):
    """Stands in for ray's ActorDiedError."""


class Script:
    """One stream per call: its items in order; an exception instance is raised there."""

    def __init__(self, items: list) -> None:
        self.items, self.cancelled = list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


class Handle:
    def __init__(self, scripts: list[list] | dict[str, list]) -> None:
        self.scripts, self.calls, self.streams = scripts, [], []

    def remote(self, request, **kwargs) -> Script:
        self.calls.append(kwargs)
        if isinstance(self.scripts, dict):  # pinned fan-out calls: by replica
            stream = Script(self.scripts[kwargs["replica"]])
        else:
            stream = Script(self.scripts[len(self.calls) - 1])
        self.streams.append(stream)
        return stream


def _front(handle: Handle, replicas=("r1", "r2"), capacity: int = 8) -> Front:
    return Front(handle, "dep", capacity=capacity, max_body_bytes=1000, replicas=lambda _: tuple(replicas))


async def _post(front: Front, path: str = "/v1/chat/completions", body: dict | bytes = CHAT) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=front.app()), base_url="http://t") as client:
        return await client.post(path, content=raw, headers={"content-type": "application/json"})


def test_a_replica_that_fails_before_its_first_byte_is_retried_elsewhere():
    handle = Handle([["r1", ReplicaDied()],  # died after taking the call
                     ["r2", Head(503, ()), b'{"error": {}}'],  # draining
                     ["r3", SSE, b"data: {}\n\n", b"data: [DONE]\n\n"]])
    front = _front(handle)
    r = asyncio.run(_post(front))
    assert r.status_code == 200 and r.headers["x-bastion-replica"] == "r3"
    assert r.text == "data: {}\n\ndata: [DONE]\n\n"
    assert [c["avoid"] for c in handle.calls] == [(), ("r1",), ("r1", "r2")]
    assert handle.calls[0]["route_key"] == "m\nuser:hi\n"
    assert handle.streams[0].cancelled and handle.streams[1].cancelled
    assert front.metrics.retries._value.get() == 2


def test_a_stream_cut_mid_way_ends_with_an_error_event_and_done():
    handle = Handle([["r1", SSE, b"data: {\"a\": 1}\n\n", ReplicaDied()]])
    front = _front(handle)
    r = asyncio.run(_post(front))
    assert r.status_code == 200 and r.headers["x-bastion-replica"] == "r1" and len(handle.calls) == 1
    events = [e for e in r.text.split("\n\n") if e]
    assert events[0] == 'data: {"a": 1}' and events[-1] == "data: [DONE]"
    assert json.loads(events[1][len("data: "):])["error"]["code"] == "replica_failed"
    assert front.metrics.cut_streams._value.get() == 1


def test_when_every_attempt_fails_the_answer_is_a_503_not_a_hang():
    handle = Handle([["r1", ReplicaDied()], [ReplicaDied()], ["r3"]])  # the last ends without a head
    r = asyncio.run(_post(_front(handle)))
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_replica"
    assert r.headers["x-bastion-replica"] == "none"


def test_non_streaming_answers_pass_through_with_their_status():
    handle = Handle([["r2", Head(401, ((b"content-type", b"application/json"),)), b'{"error": 1}']])
    r = asyncio.run(_post(_front(handle), body={"model": "m", "messages": []}))
    assert r.status_code == 401 and r.json() == {"error": 1} and r.headers["x-bastion-replica"] == "r2"
    handle = Handle([["r1", JSON, b'{"ok": true}']])
    r = asyncio.run(_post(_front(handle), path="/v1/models"))
    assert r.json() == {"ok": True} and handle.calls[0]["route_key"] is None


def test_bounds_are_answered_by_the_front():
    handle = Handle([])
    r = asyncio.run(_post(_front(handle), body=b"x" * 1001))
    assert r.status_code == 413 and handle.calls == []
    r = asyncio.run(_post(_front(handle, capacity=0)))
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and handle.calls == []


@pytest.mark.parametrize("statuses, expected", [((200, 200), 200), ((200, 409), 502)])
def test_adapter_loads_go_to_every_replica(statuses, expected):
    handle = Handle({r: [r, Head(s, ()), b'{"loaded": "a"}'] for r, s in zip(("r1", "r2"), statuses)})
    r = asyncio.run(_post(_front(handle), path="/v1/load_lora_adapter", body={"lora_name": "a"}))
    assert r.status_code == expected and {c["replica"] for c in handle.calls} == {"r1", "r2"}
    assert r.headers["x-bastion-replica"] == "r1,r2"


def test_health_is_ok_while_one_replica_is():
    handle = Handle({"r1": ["r1", Head(503, ()), b"{}"], "r2": ["r2", Head(200, ()), b"{}"]})
    front = _front(handle)

    async def get():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=front.app()), base_url="http://t") as c:
            return await c.get("/health")
    r = asyncio.run(get())
    assert r.status_code == 200 and r.json()["replicas"] == {"r1": "unhealthy", "r2": "ok"}
    handle.scripts["r2"] = ["r2", ReplicaDied()]
    r = asyncio.run(get())
    assert r.status_code == 503 and r.json()["healthy"] == 0


def test_a_chat_stream_is_retried_until_its_first_token_not_just_its_role_event():
    role = b'data: {"object": "chat.completion.chunk", "choices": [{"delta": {"role": "assistant", "content": ""}}]}'
    role += b"\n\n"
    token = b'data: {"object": "chat.completion.chunk", "choices": [{"delta": {"content": "Hi"}}]}\n\n'
    handle = Handle([["r1", SSE, role, ReplicaDied()],  # queued behind others when it died: no token yet
                     ["r2", SSE, role, token, b"data: [DONE]\n\n"]])
    front = _front(handle)
    r = asyncio.run(_post(front))
    assert r.headers["x-bastion-replica"] == "r2" and r.text == (role + token + b"data: [DONE]\n\n").decode()
    assert front.metrics.cut_streams._value.get() == 0


def test_a_replica_that_starts_after_a_runtime_adapter_load_gets_it_replayed():
    live = ["r1", "r2"]
    calls = []

    class Router:  # pinned calls answer as their replica; unpinned ones come from r1
        def remote(self, request, **kwargs):
            calls.append((request.path, kwargs.get("replica")))
            replica = kwargs.get("replica") or "r1"
            return Script([replica, Head(200, ((b"content-type", b"application/json"),)), b"{}"])

    front = Front(Router(), "dep", capacity=8, max_body_bytes=1000, replicas=lambda _: tuple(live))

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=front.app()), base_url="http://t") as c:
            await c.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/p"})
            live.append("r3")  # Serve started a replica (scale-up, or a dead one replaced)
            await c.get("/v1/models")
            await asyncio.sleep(0.05)  # the replay runs in the background
            await c.post("/v1/unload_lora_adapter", json={"lora_name": "a"})
            live.append("r4")
            await c.get("/v1/models")
            await asyncio.sleep(0.05)
    asyncio.run(run())
    loads = [replica for path, replica in calls if path == "/v1/load_lora_adapter"]
    assert loads == ["r1", "r2", "r3"]  # r4 came after the unload: nothing to replay


def test_a_keys_max_concurrent_is_counted_across_replicas():
    """Counted at the front (each replica alone would let a key run its limit on every one)."""
    from bastion.config import ApiKeyConfig, ServerConfig
    from bastion.server.tenants import Tenants

    slow = asyncio.Event()

    class SlowScript(Script):
        async def __anext__(self):
            if len(self.items) == 1:  # hold the end of the stream until released
                await slow.wait()
            return await super().__anext__()

    class SlowHandle(Handle):
        def remote(self, request, **kwargs):
            self.calls.append(kwargs)
            stream = SlowScript([f"r{len(self.calls) % 2}", SSE, b"data: {}\n\n", b"data: [DONE]\n\n"])
            self.streams.append(stream)
            return stream

    key = ApiKeyConfig(name="alice", key="sk-alice-123", max_concurrent=2)
    tenants = Tenants(ServerConfig(api_keys=(key,)), None)
    front = Front(SlowHandle([]), "dep", capacity=8, max_body_bytes=1000, replicas=lambda _: ("r0", "r1"),
                  tenants=tenants)
    alice = {"content-type": "application/json", "authorization": "Bearer sk-alice-123"}

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=front.app()), base_url="http://t") as c:
            def post(headers):
                return c.post("/v1/chat/completions", content=json.dumps(CHAT), headers=headers)

            first = [asyncio.create_task(post(alice)) for _ in range(2)]
            await asyncio.sleep(0.05)
            third = await asyncio.wait_for(post(alice), 5)
            assert third.status_code == 429 and third.json()["error"]["code"] == "rate_limit_exceeded"
            slow.set()
            assert [r.status_code for r in await asyncio.wait_for(asyncio.gather(*first), 5)] == [200, 200]
            assert (await asyncio.wait_for(post(alice), 5)).status_code == 200  # both slots were given back
            # a key the front does not know is the replica's to refuse (401 there), not the front's
            other = await asyncio.wait_for(post({"content-type": "application/json", "authorization": "Bearer x"}), 5)
            assert other.status_code == 200
            assert len(front._tenants.identify("sk-alice-123").window) == 0 and \
                front._tenants.identify("sk-alice-123").in_flight == 0

    asyncio.run(run())
