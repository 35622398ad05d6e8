"""`bastion bench fuzz`: property-based fuzzing of a live server from its own OpenAPI
schema (`bastion serve --openapi`), valid and invalid requests alike, while a bystander
keeps streaming.

Requests come from schemathesis' hypothesis strategies for every operation in the
schema, in both generation modes (positive: the schema's values, including edge
bounds; negative: values and bodies that violate it). Generated counts are clamped
(max_tokens <= `max_tokens_cap`) so that a valid request costs milliseconds, not
minutes; nothing else is changed. The property: no response is a 5xx, the server never
stops answering, and every bystander stream completes. schemathesis is a development
dependency (`pip install -e '.[dev]'`).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

_COUNT_FIELDS = ("max_tokens", "max_completion_tokens")
GENERATION_WEIGHT = 4


def generate_cases(schema: dict[str, Any], n: int, seed: int = 0, base_url: str = "http://fuzz") -> list[dict]:
    """n requests (httpx keyword arguments, url relative) drawn from the schema: every
    operation, positive and negative generation, deterministic for a seed."""
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    loaded = schemathesis.openapi.from_dict(schema)
    strategies = []
    for result in loaded.get_all_operations():
        op = result.ok()
        # the generation endpoints carry the engine's numbers: most of the budget goes there
        weight = GENERATION_WEIGHT if op.path in ("/v1/chat/completions", "/v1/completions") else 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                strategies += [op.as_strategy(generation_mode=mode)] * weight
            except Exception:  # noqa: BLE001 - an operation without a negative space (no params)
                continue
    cases: list[dict] = []

    @hypothesis.seed(seed)
    @settings(max_examples=n, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(strategies))
    def collect(case: Any) -> None:
        if len(cases) < n:
            kw = case.as_transport_kwargs(base_url=base_url)
            kw["url"] = kw["url"][len(base_url):]
            cases.append(kw)

    collect()
    return cases


def clamp(kw: dict[str, Any], cap: int) -> dict[str, Any]:
    """A valid count above `cap` becomes `cap`; a request with none gets `cap`."""
    body = kw.get("json")
    if isinstance(body, dict) and kw["url"] in ("/v1/chat/completions", "/v1/completions"):
        body = dict(body)
        for key in _COUNT_FIELDS:
            v = body.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and cap < v <= 2**63 - 1:
                body[key] = cap
        if not any(k in body for k in _COUNT_FIELDS):
            body["max_tokens"] = cap
        kw = {**kw, "json": body}
    return kw


@dataclass
class FuzzReport:
    requests: int
    statuses: dict[str, int] = field(default_factory=dict)
    server_errors: list[dict] = field(default_factory=list)  # 5xx: what was sent, what came back
    unsendable: int = 0  # generated headers httpx refuses to put on the wire
    transport_errors: list[str] = field(default_factory=list)  # the server did not answer
    bystander_streams: int = 0
    bystander_failures: list[str] = field(default_factory=list)
    health_after: int | None = None
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return (not self.server_errors and not self.transport_errors and not self.bystander_failures
                and self.health_after == 200)

    def summary(self) -> dict[str, Any]:
        return {"requests": self.requests, "statuses": dict(sorted(self.statuses.items())),
                "5xx": len(self.server_errors), "server_errors": self.server_errors[:10],
                "transport_errors": self.transport_errors[:10], "unsendable": self.unsendable,
                "bystander_streams": self.bystander_streams, "bystander_failures": self.bystander_failures[:10],
                "health_after": self.health_after, "wall_s": round(self.wall_s, 1), "ok": self.ok}


async def _bystander(client: httpx.AsyncClient, stop: asyncio.Event, report: FuzzReport) -> None:
    body = {"messages": [{"role": "user", "content": "Count from one to ten."}], "max_tokens": 24,
            "temperature": 0, "stream": True}
    while not stop.is_set():
        done, errors = False, []
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    report.bystander_failures.append(f"status {r.status_code}")
                    await r.aread()
                    continue
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: ") and "error" in json.loads(line[6:]):
                        errors.append(line)
        except httpx.HTTPError as exc:
            report.bystander_failures.append(f"{type(exc).__name__}: {exc}")
            continue
        report.bystander_streams += 1
        if not done or errors:
            report.bystander_failures.append(f"stream incomplete: done={done} errors={errors[:1]}")


async def run_fuzz(base_url: str, cases: list[dict], *, max_tokens_cap: int = 8, concurrency: int = 4,
                   headers: dict[str, str] | None = None) -> FuzzReport:
    report = FuzzReport(len(cases))
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, headers=headers, trust_env=False) as client:
        async def send(kw: dict[str, Any]) -> None:
            kw = clamp(kw, max_tokens_cap)
            async with sem:
                try:
                    r = await client.request(kw["method"], kw["url"], params=kw.get("params") or None,
                                             headers={**(kw.get("headers") or {}), **(headers or {})},
                                             cookies=kw.get("cookies") or None,
                                             json=kw.get("json"), content=kw.get("data"))
                except (httpx.LocalProtocolError, UnicodeEncodeError, TypeError, ValueError):
                    report.unsendable += 1
                    return
                except httpx.HTTPError as exc:
                    report.transport_errors.append(f"{kw['method']} {kw['url']}: {type(exc).__name__}: {exc}")
                    return
            report.statuses[str(r.status_code)] = report.statuses.get(str(r.status_code), 0) + 1
            if r.status_code >= 500:
                sent = {k: v for k, v in kw.items() if k in ("method", "url", "json", "params")}
                report.server_errors.append({"sent": repr(sent)[:500], "status": r.status_code,
                                             "body": r.text[:300]})

        stop = asyncio.Event()
        t0 = time.monotonic()
        side = asyncio.create_task(_bystander(client, stop, report))
        await asyncio.gather(*(send(kw) for kw in cases))
        stop.set()
        await side
        report.wall_s = time.monotonic() - t0
        try:
            report.health_after = (await client.get("/health")).status_code
        except httpx.HTTPError as exc:
            report.transport_errors.append(f"/health after the run: {exc}")
    return report


def fuzz_table(s: dict[str, Any]) -> str:
    return "\n".join([
        "| fuzzed requests | 5xx | no answer | bystander streams (failed) | /health after | wall (s) |",
        "|---|---|---|---|---|---|",
        f"| {s['requests']} | {s['5xx']} | {len(s['transport_errors'])} | {s['bystander_streams']} "
        f"({len(s['bystander_failures'])}) | {s['health_after']} | {s['wall_s']} |",
        "",
        "Statuses: " + ", ".join(f"{k}: {v}" for k, v in s["statuses"].items())
        + f"; unsendable (refused by the client library): {s['unsendable']}",
    ])


def plot_fuzz(result: dict[str, Any], path: Any) -> Any:
    from bastion.bench.plots import new_figure

    fig = new_figure(7, 4)
    ax = fig.subplots()
    statuses = result["summary"]["statuses"]
    colors = ["tab:red" if k.startswith("5") else "tab:green" if k.startswith("2") else "tab:blue" for k in statuses]
    ax.bar(list(statuses), list(statuses.values()), color=colors)
    ax.set_xlabel("HTTP status")
    ax.set_ylabel("responses")
    ax.set_title(f"{result['summary']['requests']} fuzzed requests: {result['summary']['5xx']} server errors")
    fig.tight_layout()
    fig.savefig(path)
    return path
