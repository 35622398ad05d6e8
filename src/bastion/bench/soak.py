"""`bastion bench soak`: N requests at concurrency C over HTTP, of every kind a server
meets in the wild, interleaved: streamed and plain chat, completions with logprobs and
stop strings, clients that disconnect mid-stream, malformed and out-of-range requests,
and poisoned requests that fail inside the engine (bench/faults.py).

Each request has an expected outcome; a failure is any request that did not get it:
a valid request that did not complete (200 and, when streamed, a full stream ending in
[DONE]), a bad request that did not get a 4xx with an OpenAI error body, a poisoned one
that did not fail (500, or an error event after its first tokens) or that failed with
anything but its own error, or any other 5xx. After the run the server must be idle
with no KV block in use (read from /metrics).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from bastion.bench.faults import POISON_SEED

KINDS = ("chat_stream", "chat", "completion", "completion_stream", "disconnect", "invalid", "poison")
WEIGHTS = (0.25, 0.15, 0.15, 0.1, 0.1, 0.2, 0.05)
_PROMPTS = ("Why is the sky blue?", "Write a haiku about the sea.", "What is free software?",
            "List three prime numbers.", "Explain a linked list in one sentence.", "Say hello in French.")
_CHAT, _COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def _invalid(rng: random.Random) -> tuple[str, dict[str, Any] | bytes]:
    """A request the server must refuse with a 4xx (each once found a crash or a 500
    somewhere: see tests/server/test_hardening.py)."""
    msg = [{"role": "user", "content": "hi"}]
    cases: list[tuple[str, dict[str, Any] | bytes]] = [
        (_CHAT, b'{"messages": ['),
        (_CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'),
        (_CHAT, {"messages": msg, "top_k": 10**20}),
        (_COMPLETIONS, {"prompt": "x", "min_tokens": 1, "stop_token_ids": [10**6]}),
        (_CHAT, {"messages": msg, "max_tokens": "16"}),
        (_CHAT, {"messages": msg, "max_tokens": 10**9}),
        (_CHAT, {"messages": msg, "temperature": -1}),
        (_COMPLETIONS, {"prompt": "x", "logprobs": True}),
        (_CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}),
        (_CHAT, {"messages": msg, "model": "no-such-model"}),
        (_COMPLETIONS, {"prompt": [2**63]}),
        (_CHAT, {"messages": msg, "n": 3}),
    ]
    return rng.choice(cases)


@dataclass
class Outcome:
    kind: str
    ok: bool
    status: int | None
    latency_s: float
    detail: str = ""


@dataclass
class SoakReport:
    requests: int
    concurrency: int
    wall_s: float
    outcomes: list[Outcome] = field(default_factory=list)
    kv_blocks_used_after: float | None = None
    running_after: float | None = None

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def summary(self) -> dict[str, Any]:
        valid = sorted(o.latency_s for o in self.outcomes if o.kind not in ("invalid", "poison", "disconnect"))
        by_kind = {k: sum(1 for o in self.outcomes if o.kind == k) for k in KINDS}
        statuses: dict[str, int] = {}
        for o in self.outcomes:
            statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
        return {
            "requests": self.requests, "concurrency": self.concurrency, "wall_s": round(self.wall_s, 2),
            "failures": len(self.failures), "failure_details": [o.__dict__ for o in self.failures[:20]],
            "unexpected_5xx": sum(1 for o in self.outcomes if (o.status or 0) >= 500 and o.kind != "poison"),
            "by_kind": by_kind, "statuses": statuses,
            "valid_latency_p50_s": _pct(valid, 50), "valid_latency_p99_s": _pct(valid, 99),
            "kv_blocks_used_after_idle": self.kv_blocks_used_after, "running_after_idle": self.running_after,
        }


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    return round(xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))], 4)


def _is_error_body(r: httpx.Response) -> bool:
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err)


async def _stream(client: httpx.AsyncClient, url: str, body: dict, stop_after: int | None = None
                  ) -> tuple[int, int, bool, list[dict]]:
    """(status, content chunks, saw [DONE], error events); stop_after: disconnect then."""
    chunks, done, errors = 0, False, []
    async with client.stream("POST", url, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, 0, False, []
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            ev = json.loads(line[6:])
            if "error" in ev:
                errors.append(ev["error"])
            elif ev.get("choices"):
                chunks += 1
                if stop_after is not None and chunks >= stop_after:
                    return 200, chunks, False, errors  # leaving the block closes the connection
    return 200, chunks, done, errors


async def _one(client: httpx.AsyncClient, kind: str, rng: random.Random, model: str | None) -> Outcome:
    t0 = time.monotonic()
    max_tokens = rng.randint(4, 24)
    chat = {"messages": [{"role": "user", "content": rng.choice(_PROMPTS)}], "max_tokens": max_tokens,
            "temperature": rng.choice([0, 0.7]), "seed": rng.randint(0, 10**6), **({"model": model} if model else {})}
    comp = {"prompt": rng.choice(_PROMPTS), "max_tokens": max_tokens, "temperature": 0.7, "seed": rng.randint(0, 99),
            "logprobs": rng.choice([None, 2]), "stop": rng.choice([None, ["\n\n"]])}
    status, ok, detail = None, False, ""
    try:
        if kind in ("chat_stream", "completion_stream"):
            url, body = (_CHAT, chat) if kind == "chat_stream" else (_COMPLETIONS, comp)
            status, chunks, done, errors = await _stream(client, url, body)
            ok = status == 200 and done and not errors
            detail = f"chunks={chunks} done={done} errors={errors}"
        elif kind in ("chat", "completion"):
            r = await client.post(_CHAT if kind == "chat" else _COMPLETIONS, json=chat if kind == "chat" else comp)
            status, ok = r.status_code, r.status_code == 200 and bool(r.json().get("choices"))
            detail = r.text[:200] if not ok else ""
        elif kind == "disconnect":
            status, chunks, _, errors = await _stream(client, _CHAT, {**chat, "max_tokens": 64, "ignore_eos": True},
                                                      stop_after=rng.randint(1, 3))
            ok = status == 200 and not errors
        elif kind == "invalid":
            url, body = _invalid(rng)
            r = await (client.post(url, content=body, headers={"content-type": "application/json"})
                       if isinstance(body, bytes) else client.post(url, json=body))
            status = r.status_code
            ok = 400 <= status < 500 and _is_error_body(r)
            detail = r.text[:200] if not ok else ""
        else:  # poison: fails alone, with its own error
            body = {**chat, "seed": POISON_SEED, "temperature": 0.7, "max_tokens": 16}
            if rng.random() < 0.5:
                r = await client.post(_CHAT, json=body)
                status = r.status_code
                ok = status == 500 and _is_error_body(r) and r.json()["error"]["code"] == "internal_error"
            else:
                status, chunks, done, errors = await _stream(client, _CHAT, body)
                ok = status == 200 and chunks >= 1 and [e.get("code") for e in errors] == ["internal_error"]
                detail = f"chunks={chunks} done={done} errors={errors}"
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        detail = f"{type(exc).__name__}: {exc}"
    return Outcome(kind, ok, status, time.monotonic() - t0, "" if ok else detail)


async def _metrics(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def run_soak(base_url: str, *, requests: int = 1000, concurrency: int = 32, seed: int = 0,
                   model: str | None = None, headers: dict[str, str] | None = None,
                   idle_timeout_s: float = 60.0) -> SoakReport:
    rng = random.Random(seed)
    kinds = rng.choices(KINDS, WEIGHTS, k=requests)
    seeds = [rng.randrange(2**32) for _ in range(requests)]
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits, headers=headers,
                                 trust_env=False) as client:
        async def guarded(i: int) -> Outcome:
            async with sem:
                return await _one(client, kinds[i], random.Random(seeds[i]), model)

        t0 = time.monotonic()
        outcomes = await asyncio.gather(*(guarded(i) for i in range(requests)))
        report = SoakReport(requests, concurrency, time.monotonic() - t0, list(outcomes))
        deadline = time.monotonic() + idle_timeout_s
        while True:  # aborted streams free their blocks within a step or two
            m = await _metrics(client)
            report.kv_blocks_used_after = m.get("bastion_kv_blocks_used")
            report.running_after = m.get("bastion_running_requests")
            if (report.kv_blocks_used_after == 0 and report.running_after == 0) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    return report


def soak_table(summary: dict[str, Any]) -> str:
    s = summary
    rows = [
        "| requests | concurrency | failures | 5xx outside poison | p50 (s) | p99 (s) | KV blocks after idle | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {s['requests']} | {s['concurrency']} | {s['failures']} | {s.get('unexpected_5xx', '-')} | "
        f"{s['valid_latency_p50_s']} | {s['valid_latency_p99_s']} | {s['kv_blocks_used_after_idle']:.0f} | "
        f"{s['wall_s']} |",
        "",
        "Requests by kind: " + ", ".join(f"{k} {v}" for k, v in s["by_kind"].items()),
        "Statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(s["statuses"].items())),
    ]
    return "\n".join(rows)


def plot_soak(result: dict[str, Any], path: Any) -> Any:
    """Outcome per request kind (ok / failed) and the latency distribution of valid requests."""
    from bastion.bench.plots import new_figure

    fig = new_figure(11, 4)
    ax1, ax2 = fig.subplots(1, 2)
    outcomes = result["outcomes"]
    ok = [sum(1 for o in outcomes if o["kind"] == k and o["ok"]) for k in KINDS]
    bad = [sum(1 for o in outcomes if o["kind"] == k and not o["ok"]) for k in KINDS]
    ax1.bar(KINDS, ok, label="as expected", color="tab:green")
    ax1.bar(KINDS, bad, bottom=ok, label="failed", color="tab:red")
    ax1.set_title(f"{result['summary']['requests']} requests at concurrency {result['summary']['concurrency']}")
    ax1.tick_params(axis="x", rotation=30)
    ax1.set_ylim(top=1.3 * max(o + b for o, b in zip(ok, bad)))
    ax1.legend(loc="upper right")
    lat = sorted(o["latency_s"] for o in outcomes if o["kind"] not in ("invalid", "poison", "disconnect"))
    if lat:
        ax2.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))])
    ax2.set_xlabel("latency of valid requests (s)")
    ax2.set_ylabel("fraction")
    ax2.set_title("latency CDF")
    fig.tight_layout()
    fig.savefig(path)
    return path
