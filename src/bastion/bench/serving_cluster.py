"""`bastion bench serving --replicas 0,1,2`: Bastion on Ray Serve (server/cluster/), one
configuration at a time alone on the machine, each `bastion serve --replicas N --threads
T` started as a subprocess with its own local Ray (N = 0: the plain single-process server
with T threads, the reference for Ray's overhead).

Per configuration, three phases:
* throughput: the `bench serving` workload (same seeded requests, streamed
  /v1/completions, fixed output length) at each --concurrency level, medians of repeats;
* prefix affinity: PREFIXES prompts of `prefix_len` tokens (windows of the corpus), each
  warmed once, then `per_prefix` requests per prefix, shuffled, each the prefix plus a
  distinct suffix, at the highest concurrency level; a request *hits* when the engine
  reports at least 90% of the prefix as cached (usage.prompt_tokens_details.cached_tokens);
  which replica served it comes from x-bastion-replica;
* kill (with --kill, N >= 2): `kill_requests` streams at the highest concurrency; once a
  few are streaming, one replica's process is SIGKILLed; a request is *lost* when it
  fails without having received a byte, *cut* when its stream ends with an error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bastion.bench import peers, serving

PREFIXES = 4


@dataclass(frozen=True)
class ClusterBenchConfig:
    replicas: tuple[int, ...] = (1, 2)
    threads: int = 1  # per replica (and the plain server's, for N = 0)
    prefix_len: int = 512
    suffix_len: int = 32
    per_prefix: int = 24
    affinity_max_tokens: int = 16
    kill: bool = False
    kill_requests: int = 200
    kill_max_tokens: int = 32

    def __post_init__(self) -> None:
        if not self.replicas or any(n < 0 for n in self.replicas):
            raise ValueError(f"replicas must be >= 0, got {self.replicas}")
        for name in ("threads", "prefix_len", "suffix_len", "per_prefix", "kill_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


def run_cluster_bench(python: str, corpus: Sequence[int], tokenizer: Any, workload: serving.WorkloadConfig,
                      cfg: serving.ServingConfig, bench: ClusterBenchConfig, out: Path, extra_args: Sequence[str] = (),
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for n in bench.replicas:
        name = "single" if n == 0 else f"replicas={n}"
        args = [*extra_args, *(["--replicas", str(n)] if n else [])]
        spec = peers.bastion_spec(python, peers.free_port(), threads=bench.threads, extra_args=args)
        spec = peers.ServerSpec(name, spec.argv, spec.port, env=spec.env, startup_timeout_s=600.0)
        log(f"starting {name}: {' '.join(spec.argv[2:])}")
        server = peers.ServerProcess(spec, out / "logs")
        try:
            server.wait_ready()
            ep = peers.Endpoint(name, spec.base_url, server.model_name())
            entry = {"serving": serving.run_serving([ep], corpus, tokenizer, workload, cfg, log)}
            level = max(cfg.concurrencies)
            entry["affinity"] = asyncio.run(_affinity(ep, corpus, bench, level, log))
            if bench.kill and n >= 2:
                entry["kill"] = asyncio.run(_kill(ep, server.proc.pid, corpus, bench, level, log))
            results[name] = entry
        finally:
            server.stop(grace_s=30.0)
    return {"bench": asdict(bench), "workload": asdict(workload), "config": asdict(cfg), "results": results,
            "summary": summarize(results, max(cfg.concurrencies))}


def summarize(results: dict[str, Any], level: int) -> dict[str, Any]:
    tok_s = {name: r["serving"]["medians"][name][str(level)]["output_tok_s"] for name, r in results.items()}
    base = tok_s.get("replicas=1")
    return {"concurrency": level, "output_tok_s": tok_s,
            "speedup_vs_1_replica": {k: (v / base if base and v else None) for k, v in tok_s.items()},
            "affinity_hit_rate": {k: r["affinity"]["hit_rate"] for k, r in results.items()},
            "kill": {k: r["kill"] for k, r in results.items() if "kill" in r}}


def _window(corpus: Sequence[int], rng: random.Random, n: int) -> list[int]:
    start = rng.randrange(0, max(1, len(corpus) - n))
    return list(corpus[start:start + n])


async def _complete(client: httpx.AsyncClient, ep: peers.Endpoint, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": ep.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    r = await client.post(f"{ep.base_url}/v1/completions", json=body)
    r.raise_for_status()
    usage = r.json()["usage"]
    return {"replica": r.headers.get("x-bastion-replica", "single"),
            "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}


async def _affinity(ep: peers.Endpoint, corpus: Sequence[int], bench: ClusterBenchConfig, concurrency: int,
                    log: Callable[[str], None]) -> dict[str, Any]:
    rng = random.Random(1234)
    prefixes = [_window(corpus, rng, bench.prefix_len) for _ in range(PREFIXES)]
    jobs = [(p, _window(corpus, rng, bench.suffix_len)) for p in range(PREFIXES) for _ in range(bench.per_prefix)]
    rng.shuffle(jobs)
    async with httpx.AsyncClient(timeout=600.0, trust_env=False) as client:
        for p in prefixes:  # each prefix computed once before the measured requests
            await _complete(client, ep, p + _window(corpus, rng, bench.suffix_len), 1)
        gate = asyncio.Semaphore(concurrency)

        async def one(p: int, suffix: list[int]) -> dict:
            async with gate:
                return {"prefix": p, **await _complete(client, ep, prefixes[p] + suffix, bench.affinity_max_tokens)}
        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(p, s) for p, s in jobs))
        elapsed = time.perf_counter() - t0
    hits = [d["cached"] >= 0.9 * bench.prefix_len for d in done]
    placement = {str(p): dict(Counter(d["replica"] for d in done if d["prefix"] == p)) for p in range(PREFIXES)}
    result = {"requests": len(done), "hit_rate": sum(hits) / len(hits), "concurrency": concurrency,
              "median_cached_tokens": statistics.median(d["cached"] for d in done),
              "replicas_per_prefix": placement, "elapsed_s": round(elapsed, 2)}
    log(f"{ep.name} affinity: hit rate {result['hit_rate']:.1%}, placement {placement}")
    return result


def _replica_pids(group: int) -> list[int]:
    """Ray Serve replica processes in the server's process group (its local Ray's)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.getpgid(int(proc.name)) == group and b"ServeReplica" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
    return sorted(pids)


async def _stream(client: httpx.AsyncClient, ep: peers.Endpoint, prompt: list[int], max_tokens: int,
                  gate: asyncio.Semaphore, started: list[int]) -> str:
    """ok | cut (an error event, then [DONE]) | lost (failed before any byte) | broken
    (started, then ended without [DONE]: what must never happen)."""
    body = {"model": ep.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    began = False
    async with gate:
        try:
            async with client.stream("POST", f"{ep.base_url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return "lost"
                began = True
                started.append(1)
                text = (await r.aread()).decode("utf-8", "replace")
        except httpx.HTTPError:
            return "broken" if began else "lost"
    if not text.rstrip().endswith("data: [DONE]"):
        return "broken"
    return "cut" if '"error"' in text else "ok"


async def _kill(ep: peers.Endpoint, group: int, corpus: Sequence[int], bench: ClusterBenchConfig,
                concurrency: int, log: Callable[[str], None]) -> dict[str, Any]:
    rng = random.Random(99)
    gate, started = asyncio.Semaphore(concurrency), []
    async with httpx.AsyncClient(timeout=600.0, trust_env=False) as client:
        tasks = [asyncio.create_task(_stream(client, ep, _window(corpus, rng, 64), bench.kill_max_tokens, gate,
                                             started)) for _ in range(bench.kill_requests)]
        while len(started) < concurrency and not all(t.done() for t in tasks):
            await asyncio.sleep(0.05)
        victims = _replica_pids(group)
        killed = victims[0] if victims else None
        if killed is not None:
            os.kill(killed, signal.SIGKILL)
        outcomes = Counter(await asyncio.gather(*tasks))
    result = {"requests": bench.kill_requests, "killed_pid": killed, "ok": outcomes["ok"], "cut": outcomes["cut"],
              "lost": outcomes["lost"], "broken": outcomes["broken"]}
    log(f"{ep.name} kill: {json.dumps(result)}")
    return result


def table(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [f"| configuration | output tok/s @ {s['concurrency']} | vs 1 replica | prefix-cache hit rate |",
             "|---|---:|---:|---:|"]
    for name, tok_s in s["output_tok_s"].items():
        speedup = s["speedup_vs_1_replica"].get(name)
        lines.append(f"| {name} | {tok_s:.1f} | {f'{speedup:.2f}x' if speedup else '-'} | "
                     f"{s['affinity_hit_rate'][name]:.1%} |")
    for name, k in s["kill"].items():
        lines.append(f"\nkill ({name}): {k['requests']} requests, {k['ok']} ok, {k['cut']} cut mid-stream "
                     f"(clean error event), {k['lost']} lost before their first byte, {k['broken']} broken")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | Path) -> Path:
    from bastion.bench.plots import new_figure

    s = result["summary"]
    names = list(s["output_tok_s"])
    fig = new_figure(10, 4)
    left, right = fig.subplots(1, 2)
    left.bar(names, [s["output_tok_s"][n] or 0 for n in names], color="tab:blue")
    left.set_title(f"aggregate output tok/s, {s['concurrency']} concurrent")
    right.bar(names, [100 * s["affinity_hit_rate"][n] for n in names], color="tab:green")
    right.axhline(90, color="gray", linestyle="--", linewidth=1)
    right.set_ylim(0, 100)
    right.set_title(f"prefix-cache hits, {result['bench']['prefix_len']}-token shared prefixes (%)")
    for ax in (left, right):
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"bastion bench serving --replicas: {result['bench']['threads']} thread(s) per replica")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
