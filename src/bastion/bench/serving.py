"""`bastion bench serving`: an async HTTP load generator for OpenAI-compatible servers.

Each request streams `/v1/completions` (SSE) with a fixed output length (`ignore_eos`
or the server's equivalent), so every server does the same amount of work. Prompts are
windows of real text (the licenses in /usr/share/common-licenses), with lengths drawn
from a seeded distribution: the same seed gives byte-identical requests on any target,
which is what makes ratios between servers measured in one run meaningful.

Per concurrency level we report TTFT and inter-token latency percentiles, aggregate
output tokens/s and requests/s; repeats are interleaved across targets (so machine
noise hits all of them alike) and summarised by their median.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bastion.bench.peers import Endpoint
from bastion.bench.plots import format_level_line
from bastion.bench.workload import (  # noqa: F401  (part of this module's API)
    DEFAULT_TEXT_DIR, BenchRequest, Tokenizer, WorkloadConfig, load_corpus_text, make_requests)

# Metrics where bigger is better; for the rest (latencies) the ratio is inverted so that a
# ratio > 1 always means "the reference target is better".
_HIGHER_IS_BETTER = ("output_tok_s", "request_s")
_RATIO_METRICS = ("output_tok_s", "request_s", "ttft_p50_ms", "itl_p50_ms")


@dataclass(frozen=True)
class ServingConfig:
    concurrencies: tuple[int, ...] = (1, 4, 16, 32)
    rounds: int = 2  # requests per level = max(min_requests, rounds * concurrency)
    min_requests: int = 4
    repeats: int = 3
    warmup_requests: int = 2
    request_timeout_s: float = 300.0
    level_timeout_s: float = 600.0  # a level still running then is cut and marked partial
    total_timeout_s: float = 3 * 3600.0  # levels not started by then are skipped

    def __post_init__(self) -> None:
        if not self.concurrencies or any(c < 1 for c in self.concurrencies):
            raise ValueError(f"concurrencies must be >= 1, got {self.concurrencies}")
        for name in ("rounds", "min_requests", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.warmup_requests < 0:
            raise ValueError("warmup_requests must be >= 0")
        for name in ("request_timeout_s", "level_timeout_s", "total_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")

    def num_requests(self, concurrency: int) -> int:
        return max(self.min_requests, self.rounds * concurrency)


# ---------------------------------------------------------------- SSE client


class SSEDecoder:
    """Server-sent events, line by line (WHATWG rules we need): `data:` lines accumulate,
    a blank line dispatches the event, `:` lines are comments, other fields are ignored."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        """An event left without its closing blank line when the stream ends."""
        return self.feed("")


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    expected_output_len: int
    output_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float | None = None
    itls_s: list[float] = field(default_factory=list)
    error: str | None = None


def _chunk_text(chunk: Mapping[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    first = choices[0]
    if "text" in first:
        return first.get("text") or ""
    return (first.get("delta") or {}).get("content") or ""


def result_from_events(
    start: float, events: Iterable[tuple[float, Mapping[str, Any]]], end: float, req: BenchRequest
) -> RequestResult:
    """Timing of one stream from (arrival time, parsed chunk) pairs. A chunk with text is a
    token arrival; TTFT is the first one, ITLs are the gaps between consecutive ones. The
    server's usage count (when sent) is the output length, else the number of text chunks."""
    times: list[float] = []
    usage_tokens = None
    for t, chunk in events:
        if "error" in chunk:
            return RequestResult(False, len(req.prompt_ids), req.output_len, error=str(chunk["error"]))
        if _chunk_text(chunk):
            times.append(t)
        usage = chunk.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            usage_tokens = int(usage["completion_tokens"])
    if not times:
        return RequestResult(False, len(req.prompt_ids), req.output_len, error="no tokens streamed")
    return RequestResult(
        ok=True,
        prompt_len=len(req.prompt_ids),
        expected_output_len=req.output_len,
        output_tokens=usage_tokens if usage_tokens is not None else len(times),
        ttft_s=times[0] - start,
        latency_s=end - start,
        itls_s=[b - a for a, b in zip(times, times[1:])],
    )


async def run_request(client: httpx.AsyncClient, ep: Endpoint, req: BenchRequest) -> RequestResult:
    fail = RequestResult(False, len(req.prompt_ids), req.output_len)
    events: list[tuple[float, Mapping[str, Any]]] = []
    start = time.perf_counter()
    try:
        async with client.stream("POST", f"{ep.base_url}/v1/completions", json=ep.body(req),
                                 headers=dict(ep.headers)) as resp:
            if resp.status_code != 200:
                fail.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return fail
            decoder = SSEDecoder()
            async for line in resp.aiter_lines():
                data = decoder.feed(line)
                if data is None:
                    continue
                now = time.perf_counter()
                if data.strip() == "[DONE]":
                    break
                events.append((now, json.loads(data)))
            tail = decoder.flush()
            if tail is not None and tail.strip() != "[DONE]":
                events.append((time.perf_counter(), json.loads(tail)))
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        fail.error = f"{type(exc).__name__}: {exc}"
        return fail
    return result_from_events(start, events, time.perf_counter(), req)


async def run_level(
    ep: Endpoint, requests: Sequence[BenchRequest], concurrency: int, cfg: ServingConfig
) -> tuple[list[RequestResult], float, bool]:
    """`concurrency` workers drain the request list (a closed loop, like vLLM's
    --max-concurrency). Returns (results, wall seconds, completed-in-time)."""
    queue: asyncio.Queue[BenchRequest] = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=30.0)

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            try:
                req = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results.append(await run_request(client, ep, req))

    start = time.perf_counter()
    complete = True
    # trust_env=False: never route loopback benchmark traffic through a proxy from the env.
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        tasks = [asyncio.create_task(worker(client)) for _ in range(concurrency)]
        done, pending = await asyncio.wait(tasks, timeout=cfg.level_timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        complete = not pending
    return results, time.perf_counter() - start, complete


# ---------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None when empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else 1000.0 * x


def summarize(results: Sequence[RequestResult], duration_s: float, concurrency: int) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    itls = [x for r in ok for x in r.itls_s]
    # TPOT: mean time per output token after the first, per request (vLLM's definition).
    tpots = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in ok
             if r.output_tokens > 1 and r.latency_s is not None and r.ttft_s is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    errors = sorted({r.error for r in results if r.error})
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "prompt_tokens": sum(r.prompt_len for r in ok),
        "output_tokens": out_tokens,
        "short_outputs": sum(1 for r in ok if r.output_tokens < r.expected_output_len),
        "output_tok_s": out_tokens / duration_s if duration_s > 0 else 0.0,
        "request_s": len(ok) / duration_s if duration_s > 0 else 0.0,
        "ttft_p50_ms": _ms(percentile(ttfts, 50)),
        "ttft_p99_ms": _ms(percentile(ttfts, 99)),
        "itl_p50_ms": _ms(percentile(itls, 50)),
        "itl_p99_ms": _ms(percentile(itls, 99)),
        "tpot_p50_ms": _ms(percentile(tpots, 50)),
        "errors": errors[:5],
    }


def median_of_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Median over repeats of every numeric metric (None values are skipped)."""
    out: dict[str, Any] = {}
    for key in runs[0]:
        vals = [r[key] for r in runs
                if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if vals:
            out[key] = statistics.median(vals)
    out["runs"] = len(runs)
    return out


def ratios(medians: Mapping[str, Mapping[int, Mapping[str, Any]]], reference: str) -> dict[str, Any]:
    """reference-vs-peer ratio per level and metric; > 1 means the reference is better."""
    out: dict[str, Any] = {}
    ref = medians.get(reference, {})
    for peer, levels in medians.items():
        if peer == reference:
            continue
        per_level = {}
        for c, peer_m in levels.items():
            ref_m = ref.get(c)
            if not ref_m:
                continue
            row = {}
            for key in _RATIO_METRICS:
                a, b = ref_m.get(key), peer_m.get(key)
                if a and b:
                    row[key] = a / b if key in _HIGHER_IS_BETTER else b / a
            per_level[str(c)] = row
        out[peer] = per_level
    return out


# ---------------------------------------------------------------- orchestration


def run_serving(
    endpoints: Sequence[Endpoint],
    corpus_ids: Sequence[int],
    tokenizer: Tokenizer,
    workload: WorkloadConfig,
    cfg: ServingConfig,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Warm up each endpoint, then for each repeat and level run every endpoint on the
    same requests, rotating the endpoint order per repeat. The first endpoint is the
    reference for ratios."""
    if not endpoints:
        raise ValueError("no endpoints to benchmark")
    deadline = time.monotonic() + cfg.total_timeout_s
    raw: dict[str, dict[int, list[dict[str, Any]]]] = {e.name: {} for e in endpoints}
    partial = False
    for ep in endpoints:
        if cfg.warmup_requests:
            warm = make_requests(corpus_ids, tokenizer, workload, cfg.warmup_requests, workload.seed - 1)
            res, _, _ = asyncio.run(run_level(ep, warm, cfg.warmup_requests, cfg))
            bad = [r.error for r in res if not r.ok]
            if bad:
                raise RuntimeError(f"{ep.name}: warm-up failed: {bad[0]}")
            if any(r.output_tokens < r.expected_output_len for r in res):
                log(f"WARNING: {ep.name} stopped before max_tokens: EOS is not suppressed, "
                    "its tokens/s will not be comparable")
    for rep in range(cfg.repeats):
        for li, conc in enumerate(cfg.concurrencies):
            reqs = make_requests(corpus_ids, tokenizer, workload, cfg.num_requests(conc),
                                 workload.seed + 1000 * rep + li)
            # Rotate so no endpoint always runs first (or right after a given other one).
            order = list(endpoints[rep % len(endpoints):]) + list(endpoints[: rep % len(endpoints)])
            for ep in order:
                if time.monotonic() > deadline:
                    partial = True
                    log(f"time budget spent; skipping {ep.name} c={conc} repeat {rep + 1}")
                    continue
                res, dur, complete = asyncio.run(run_level(ep, reqs, conc, cfg))
                stats = summarize(res, dur, conc)
                stats["complete"] = complete
                stats["planned"] = len(reqs)  # > requests when the level was cut by its timeout
                partial |= not complete
                raw[ep.name].setdefault(conc, []).append(stats)
                log(format_level_line(ep.name, rep, stats))
    medians = {name: {c: median_of_runs(runs) for c, runs in levels.items()} for name, levels in raw.items()}
    return {
        "workload": asdict(workload),
        "config": asdict(cfg),
        "endpoints": [{"name": e.name, "dialect": e.dialect, "model": e.model,
                       "prompt_format": e.prompt_format if e.dialect == "openai" else "text"}
                      for e in endpoints],
        "reference": endpoints[0].name,
        "partial": partial,
        "runs": {n: {str(c): v for c, v in lv.items()} for n, lv in raw.items()},
        "medians": {n: {str(c): v for c, v in lv.items()} for n, lv in medians.items()},
        "ratios": ratios(medians, endpoints[0].name),
    }


def write_json(result: Mapping[str, Any], out_dir: str | Path, name: str = "serving.json") -> Path:
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    target = path / name
    target.write_text(json.dumps(result, indent=2, sort_keys=False))
    return target
