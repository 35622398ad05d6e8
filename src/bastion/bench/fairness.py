"""`bastion bench fairness`: does one tenant's flood starve another? (issue 20)

Two API keys on one Bastion server: "flood" keeps `flood_concurrency` streams open at all
times (a closed loop: each one that ends is replaced at once), "quiet" sends one request at
a time with a pause between them. The quiet tenant's time to first token is measured
alone and then under the flood, per scheduling policy (each policy gets a server of its
own, same flags otherwise); the flood's own throughput is reported beside it, so a policy
that wins fairness by idling the machine would show.

The number to reach (fair mode): quiet p99 TTFT under the flood <= 2x its p99 alone. With
`quiet_requests` samples p99 is close to the worst one; the JSON keeps every sample.
Repeats are interleaved (alone, flood, alone, flood, ...) and summarised by their median.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bastion.bench import peers
from bastion.bench.report import write_report
from bastion.bench.serving import RequestResult, percentile, run_request
from bastion.bench.workload import BenchRequest, WorkloadConfig, load_corpus_text, make_requests

FLOOD_KEY, QUIET_KEY = "sk-bench-flood-0001", "sk-bench-quiet-0001"


@dataclass(frozen=True)
class FairnessConfig:
    policies: tuple[str, ...] = ("fcfs", "fair")
    flood_concurrency: int = 32
    flood_output_len: int = 64
    quiet_requests: int = 20
    quiet_output_len: int = 8
    quiet_gap_s: float = 0.25  # pause between two quiet requests
    input_len: int = 128
    max_num_seqs: int = 16
    # the step budget: a smaller one bounds how long one step (and a wait for it) lasts;
    # 256 is what docs/DEPLOY.md advises with --scheduling-policy fair (512 is the server's default)
    max_num_batched_tokens: int = 256
    repeats: int = 3
    threads: int = 2
    settle_s: float = 3.0  # flood running before the quiet tenant starts (queues full)
    text_dir: str = "/usr/share/common-licenses"

    def __post_init__(self) -> None:
        for name in ("flood_concurrency", "flood_output_len", "quiet_requests", "quiet_output_len", "input_len",
                     "max_num_seqs", "max_num_batched_tokens", "repeats", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.policies or any(p not in ("fcfs", "priority", "fair") for p in self.policies):
            raise ValueError(f"policies must be among fcfs, priority, fair; got {self.policies}")


def _keys_file(directory: Path) -> Path:
    path = directory / "keys.toml"
    path.write_text(f'[[keys]]\nname = "flood"\nkey = "{FLOOD_KEY}"\n\n[[keys]]\nname = "quiet"\nkey = "{QUIET_KEY}"\n')
    return path


def _endpoint(base_url: str, model: str, key: str) -> peers.Endpoint:
    return peers.Endpoint(key, base_url, model, headers={"Authorization": f"Bearer {key}"})


async def _quiet_run(ep: peers.Endpoint, requests: Sequence[BenchRequest], gap_s: float) -> list[RequestResult]:
    out = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=30.0), trust_env=False) as client:
        for req in requests:
            out.append(await run_request(client, ep, req))
            await asyncio.sleep(gap_s)
    return out


async def _with_flood(flood: peers.Endpoint, quiet: peers.Endpoint, flood_reqs: Sequence[BenchRequest],
                      quiet_reqs: Sequence[BenchRequest], cfg: FairnessConfig, start: int = 0,
                      ) -> tuple[list[RequestResult], dict]:
    """Quiet requests under a closed-loop flood; the flood's tokens/s while they ran."""
    stop = asyncio.Event()
    done: list[tuple[float, RequestResult]] = []
    limits = httpx.Limits(max_connections=cfg.flood_concurrency + 4)

    async def flooder(client: httpx.AsyncClient, k: int) -> None:
        i = k
        while not stop.is_set():
            result = await run_request(client, flood, flood_reqs[(start + i) % len(flood_reqs)])
            done.append((time.perf_counter(), result))
            i += cfg.flood_concurrency

    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0, connect=30.0),
                                 trust_env=False) as client:
        tasks = [asyncio.create_task(flooder(client, k)) for k in range(cfg.flood_concurrency)]
        await asyncio.sleep(cfg.settle_s)
        t0 = time.perf_counter()
        quiet_results = await _quiet_run(quiet, quiet_reqs, cfg.quiet_gap_s)
        t1 = time.perf_counter()
        stop.set()
        for task in tasks:  # cut the open streams: the server aborts them (client gone)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    in_window = [r for t, r in done if t0 <= t <= t1 and r.ok]
    return quiet_results, {"flood_output_tok_s": sum(r.output_tokens for r in in_window) / max(t1 - t0, 1e-9),
                           "flood_requests_done": len(in_window),
                           "flood_errors": sum(1 for _, r in done if not r.ok)}


def _ttft_stats(results: Sequence[RequestResult]) -> dict[str, Any]:
    ttfts = [r.ttft_s * 1000 for r in results if r.ok and r.ttft_s is not None]
    return {"ok": len(ttfts), "failed": len(results) - len(ttfts), "ttft_ms": ttfts,
            "ttft_p50_ms": percentile(ttfts, 50), "ttft_p99_ms": percentile(ttfts, 99)}


def _median(runs: Sequence[Mapping[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def run_fairness(cfg: FairnessConfig, python: str = sys.executable, model: str | None = None,
                 log_dir: str | Path = "bench_results/fairness/logs") -> dict[str, Any]:
    tokenizer = peers.load_tokenizer(model)
    corpus = tokenizer.encode(load_corpus_text(cfg.text_dir), add_special_tokens=False)
    # NOTE: every phase of every repeat asks new prompts (and the flood never repeats one): a
    # prompt seen before would be served from the prefix cache and flatter that phase's TTFT
    n_quiet = cfg.quiet_requests * (2 * cfg.repeats + 1)
    quiet_all = make_requests(corpus, tokenizer, WorkloadConfig(cfg.input_len, cfg.quiet_output_len, 0.25, 1,
                                                                cfg.text_dir), n_quiet, seed=1)
    flood_reqs = make_requests(corpus, tokenizer, WorkloadConfig(cfg.input_len, cfg.flood_output_len, 0.25, 2,
                                                                 cfg.text_dir), 2000, seed=2)

    def quiet_batch(i: int) -> list[BenchRequest]:
        return quiet_all[i * cfg.quiet_requests:(i + 1) * cfg.quiet_requests]
    result: dict[str, Any] = {"config": asdict(cfg), "policies": {}}
    with tempfile.TemporaryDirectory() as tmp:
        keys = _keys_file(Path(tmp))
        for policy in cfg.policies:
            args = ["--api-keys", str(keys), "--scheduling-policy", policy, "--max-num-seqs", str(cfg.max_num_seqs),
                    "--max-num-batched-tokens", str(cfg.max_num_batched_tokens), "--max-waiting", "1024", "--no-web"]
            spec = peers.bastion_spec(python, peers.free_port(), model, cfg.threads, args)
            runs = []
            with peers.running(spec, log_dir):
                name = _model_id(spec.base_url)
                flood, quiet = _endpoint(spec.base_url, name, FLOOD_KEY), _endpoint(spec.base_url, name, QUIET_KEY)
                asyncio.run(_quiet_run(quiet, quiet_batch(2 * cfg.repeats)[:2], 0.0))  # warm-up
                for rep in range(cfg.repeats):
                    alone = _ttft_stats(asyncio.run(_quiet_run(quiet, quiet_batch(2 * rep), cfg.quiet_gap_s)))
                    flooded, flood_stats = asyncio.run(_with_flood(flood, quiet, flood_reqs, quiet_batch(2 * rep + 1),
                                                                   cfg, start=rep * len(flood_reqs) // cfg.repeats))
                    under = _ttft_stats(flooded)
                    run = {"alone": alone, "flood": under, **flood_stats,
                           "p99_ratio": (under["ttft_p99_ms"] / alone["ttft_p99_ms"]
                                         if under["ttft_p99_ms"] and alone["ttft_p99_ms"] else None)}
                    runs.append(run)
                    print(f"{policy} rep {rep}: quiet p99 TTFT alone {alone['ttft_p99_ms']:.0f} ms, under flood "
                          f"{under['ttft_p99_ms'] or float('nan'):.0f} ms (x{run['p99_ratio'] or float('nan'):.2f}); "
                          f"flood {flood_stats['flood_output_tok_s']:.0f} tok/s", flush=True)
            flat = [{"alone_p50": r["alone"]["ttft_p50_ms"], "alone_p99": r["alone"]["ttft_p99_ms"],
                     "flood_p50": r["flood"]["ttft_p50_ms"], "flood_p99": r["flood"]["ttft_p99_ms"],
                     "p99_ratio": r["p99_ratio"], "flood_tok_s": r["flood_output_tok_s"]} for r in runs]
            result["policies"][policy] = {"runs": runs, "median": {k: _median(flat, k) for k in flat[0]}}
    return result


def _model_id(base_url: str) -> str:
    resp = httpx.get(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {QUIET_KEY}"}, timeout=10.0,
                     trust_env=False)
    resp.raise_for_status()
    return str(resp.json()["data"][0]["id"])


def fairness_table(result: Mapping[str, Any]) -> str:
    c = result["config"]
    lines = [f"Quiet tenant TTFT alone and under the other tenant's flood ({c['flood_concurrency']} open streams of "
             f"{c['flood_output_len']} tokens; quiet: {c['quiet_requests']} sequential requests of "
             f"~{c['input_len']} prompt tokens; --max-num-seqs {c['max_num_seqs']}, --max-num-batched-tokens "
             f"{c.get('max_num_batched_tokens', 512)}; median of {c['repeats']} runs)",
             "", "| policy | quiet p50 alone (ms) | quiet p99 alone | quiet p50 flood | quiet p99 flood | "
             "p99 flood / alone | flood tok/s |", "|---|---|---|---|---|---|---|"]

    def f(x: Any, d: int = 0) -> str:
        return "—" if x is None else f"{x:.{d}f}"

    for policy, entry in result["policies"].items():
        m = entry["median"]
        lines.append(f"| {policy} | {f(m['alone_p50'])} | {f(m['alone_p99'])} | {f(m['flood_p50'])} | "
                     f"{f(m['flood_p99'])} | {f(m['p99_ratio'], 2)}x | {f(m['flood_tok_s'])} |")
    return "\n".join(lines)


def plot_fairness(result: Mapping[str, Any], path: str | Path) -> Path:
    from bastion.bench.plots import new_figure

    fig = new_figure(7.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    policies = list(result["policies"])
    for i, policy in enumerate(policies):
        for j, (phase, color) in enumerate((("alone", "tab:green"), ("flood", "tab:red"))):
            samples = [t for run in result["policies"][policy]["runs"] for t in run[phase]["ttft_ms"]]
            x = i * 3 + j
            ax.scatter([x] * len(samples), samples, s=8, alpha=0.5, color=color,
                       label=f"quiet {phase}" if i == 0 else None)
            ax.hlines(result["policies"][policy]["median"][f"{phase}_p99"], x - 0.35, x + 0.35, color=color)
    ax.set_xticks([i * 3 + 0.5 for i in range(len(policies))], policies)
    ax.set_yscale("log")
    ax.set_ylabel("quiet tenant TTFT (ms, log); bar = p99")
    ax.set_title("Fairness: one tenant floods, the other asks")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def add_fairness_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("fairness", help="two tenants, one flooding: the quiet one's TTFT per scheduling policy")
    p.add_argument("--policies", default="fcfs,fair", help="comma list of fcfs, priority, fair")
    p.add_argument("--flood-concurrency", type=int, default=32)
    p.add_argument("--quiet-requests", type=int, default=20)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=FairnessConfig.max_num_batched_tokens,
                   help="the server's step budget (default: 256, as docs/DEPLOY.md advises for fair mode)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="GGUF file or HF dir (default: the embedded SmolLM2)")
    p.add_argument("--out", default="bench_results/fairness")
    p.set_defaults(func=run_fairness_cmd)


def run_fairness_cmd(args: argparse.Namespace) -> int:
    try:
        cfg = FairnessConfig(policies=tuple(x.strip() for x in args.policies.split(",") if x.strip()),
                             flood_concurrency=args.flood_concurrency, quiet_requests=args.quiet_requests,
                             max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                             repeats=args.repeats, threads=args.threads)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    with contextlib.suppress(KeyboardInterrupt):
        result = run_fairness(cfg, model=args.model, log_dir=out / "logs")
        write_report(out, "fairness", result, fairness_table(result), plot_fairness)
        return 0
    return 130
