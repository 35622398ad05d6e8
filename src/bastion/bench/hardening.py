"""`bastion bench soak` and `bastion bench fuzz`: the robustness benchmarks' commands.
Each starts its own server (or uses --url), drives it (bench/soak.py, bench/fuzz.py) and
writes JSON + Markdown + PNG. Exit status 1 when the run found a failure."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from bastion.bench import peers
from bastion.bench.report import write_report


def add_hardening_parsers(subparsers: Any) -> None:
    s = subparsers.add_parser("soak", help="N mixed requests (valid, invalid, disconnecting, poisoned) at "
                              "concurrency C over HTTP: failures, p50/p99, KV blocks left after idle")
    s.add_argument("--requests", type=int, default=1000)
    s.add_argument("--concurrency", type=int, default=32)
    _common(s, "bench_results/soak")
    s.set_defaults(func=run_soak_cmd)

    f = subparsers.add_parser("fuzz", help="property-based fuzzing from the server's OpenAPI schema (valid and "
                              "invalid requests) with a bystander stream: 5xx, crashes, bystander failures")
    f.add_argument("--requests", type=int, default=2000)
    f.add_argument("--concurrency", type=int, default=4)
    f.add_argument("--max-tokens", type=int, default=8, help="cap on generated max_tokens (keeps requests cheap)")
    _common(f, "bench_results/fuzz")
    f.set_defaults(func=run_fuzz_cmd)


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--url", help="a running server instead of starting one (soak: started with "
                   "`python -m bastion.bench.faulty_server serve --openapi` to include poisoned requests)")
    p.add_argument("--model", help="model to serve (default: the embedded SmolLM2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bastion-arg", action="append", default=[], help="extra arg for the server (repeatable)")
    p.add_argument("--out", default=out)


ADMIN_KEY = "bench-admin"  # the fuzz server's: its admin endpoints are fuzzed too, past the key


def _server(args: argparse.Namespace, faults: bool) -> peers.ServerSpec:
    port = peers.free_port()
    module = "bastion.bench.faulty_server" if faults else "bastion.cli"
    argv = [sys.executable, "-m", module, "serve", *([args.model] if args.model else []), "--host", "127.0.0.1",
            "--port", str(port), "--threads", str(args.threads), "--openapi", "--admin-key", ADMIN_KEY,
            *args.bastion_arg]
    return peers.ServerSpec("bastion", tuple(argv), port, env=peers.thread_env(args.threads))


def _positive(args: argparse.Namespace) -> str | None:
    for name in ("requests", "concurrency"):
        if getattr(args, name) < 1:
            return f"--{name} must be >= 1"
    return None


def run_soak_cmd(args: argparse.Namespace) -> int:
    from bastion.bench.soak import plot_soak, run_soak, soak_table

    if (problem := _positive(args)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if args.url:
        report = asyncio.run(run_soak(args.url.rstrip("/"), requests=args.requests, concurrency=args.concurrency,
                                      seed=args.seed))
    else:
        with peers.running(_server(args, faults=True), out / "logs") as server:
            report = asyncio.run(run_soak(server.spec.base_url, requests=args.requests,
                                          concurrency=args.concurrency, seed=args.seed))
    summary = report.summary()
    result = {"summary": summary, "outcomes": [o.__dict__ for o in report.outcomes]}
    write_report(out, "soak", result, soak_table(summary), plot_soak)
    return 0 if summary["failures"] == 0 and summary["kv_blocks_used_after_idle"] == 0 else 1


def run_fuzz_cmd(args: argparse.Namespace) -> int:
    import httpx

    from bastion.bench.fuzz import fuzz_table, generate_cases, plot_fuzz, run_fuzz

    if (problem := _positive(args)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    out = Path(args.out)

    def fuzz(url: str) -> Any:
        schema = httpx.get(url + "/openapi.json", timeout=10, trust_env=False)
        if schema.status_code != 200:
            raise SystemExit(f"error: {url}/openapi.json answered {schema.status_code}: start it with --openapi")
        cases = generate_cases(schema.json(), args.requests, seed=args.seed)
        return asyncio.run(run_fuzz(url, cases, max_tokens_cap=args.max_tokens, concurrency=args.concurrency,
                                    headers=None if args.url else {"X-Admin-Key": ADMIN_KEY}))

    if args.url:
        report = fuzz(args.url.rstrip("/"))
    else:
        with peers.running(_server(args, faults=False), out / "logs") as server:
            report = fuzz(server.spec.base_url)
            alive = server.proc.poll() is None
        if not alive:
            report.transport_errors.append("the server process died during the run")
    summary = report.summary()
    write_report(out, "fuzz", {"summary": summary}, fuzz_table(summary), plot_fuzz)
    return 0 if report.ok else 1
