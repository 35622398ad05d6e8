"""`bastion bench security --held-out --server`: the held-out cohort's adapters loaded into
a running `bastion serve` (POST /v1/load_lora_adapter), each one's whole scan timed as the
server runs it before serving: static checks at once, then in the background the candidate
battery, task probes, target inversion and trigger search (adapters/deep_scan.py), from
the scan's start to its verdict (GET /v1/lora_adapters/NAME: scan_started_at,
finished_at). The scan cache is a fresh directory, so nothing is answered from it; the
adapters are loaded one at a time, so a scan never waits behind another.
Issue 19's goal: <= 2 minutes per adapter on this machine."""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from pathlib import Path

import httpx

from bastion.bench import peers
from bastion.bench import security_cohort as sc
from bastion.bench.security_heldout import heldout_specs

ADMIN_KEY = "bench-admin"
GOAL_S = 120.0


def run_server_scans(out: str | Path, seed: int, size: tuple[int, int], *, threads: int = 2,
                     timeout_s: float = 900.0, log=print) -> dict:
    out = Path(out)
    specs = heldout_specs(seed, *size)
    cohort = sc.build(out / f"seed{seed}", specs=specs, log=log)
    cache = out / "server-scan-cache"
    shutil.rmtree(cache, ignore_errors=True)
    port = peers.free_port()
    argv = (sys.executable, "-m", "bastion.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--threads", str(threads), "--admin-key", ADMIN_KEY, "--scan-cache", str(cache),
            "--max-lora-rank", str(max(s.r for s in specs)))
    spec = peers.ServerSpec("bastion", argv, port, env=peers.thread_env(threads))
    rows = []
    with peers.running(spec, out / "logs") as server:
        headers = {"X-Admin-Key": ADMIN_KEY}
        def job(name: str) -> dict:
            return httpx.get(f"{server.spec.base_url}/v1/lora_adapters/{name}", headers=headers, timeout=30.0,
                             trust_env=False).json()

        for s, path in cohort.adapters():
            httpx.post(f"{server.spec.base_url}/v1/load_lora_adapter", headers=headers, timeout=60.0,
                       json={"lora_name": s.name, "lora_path": str(path)}, trust_env=False)
            t0, state = time.monotonic(), job(s.name)  # 202 pending, or decided at once (200 / 400)
            while state.get("state") == "pending":
                if time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(f"{s.name}: still pending after {timeout_s:.0f} s")
                time.sleep(1.0)
                state = job(s.name)
            started, finished = state.get("scan_started_at"), state.get("finished_at")
            seconds = finished - started if started is not None and finished is not None else None
            rows.append({"name": s.name, "kind": s.kind, "state": state.get("state"), "vetting": state.get("vetting"),
                         "scan_seconds": seconds})
            log(f"  {s.name}: {state.get('state')} ({state.get('vetting')}), scan {seconds or 0:.1f} s")
    return {"summary": summarize(rows, threads), "rows": rows}


def summarize(rows: list[dict], threads: int) -> dict:
    """Scan times of the adapters the server scanned (a static refusal has none)."""
    times = [r["scan_seconds"] for r in rows if r["scan_seconds"] is not None]
    return {"adapters": len(rows), "scanned": len(times), "threads": threads, "goal_s": GOAL_S,
            "median_s": statistics.median(times) if times else None, "max_s": max(times, default=None),
            "within_goal": sum(t <= GOAL_S for t in times),
            "flagged": {kind: sum(r["kind"] == kind and r["vetting"] in ("warn", "fail") for r in rows)
                        for kind in ("poison", "clean")}}


def table(result: dict) -> str:
    lines = ["| adapter | kind | server state | verdict | scan s |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        t = f"{r['scan_seconds']:.1f}" if r["scan_seconds"] is not None else "-"
        lines.append(f"| {r['name']} | {r['kind']} | {r['state']} | {r['vetting']} | {t} |")
    s = result["summary"]
    if s["median_s"] is not None:
        lines += ["", f"median {s['median_s']:.1f} s, max {s['max_s']:.1f} s; {s['within_goal']} of {s['scanned']} "
                  f"within {s['goal_s']:.0f} s ({s['threads']} threads)"]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    from bastion.bench.plots import new_figure

    rows = [r for r in result["rows"] if r["scan_seconds"] is not None]
    fig = new_figure(8, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(rows)), [r["scan_seconds"] for r in rows],
           color=["tab:red" if r["kind"] == "poison" else "tab:blue" for r in rows])
    ax.axhline(result["summary"]["goal_s"], color="k", linestyle="--", linewidth=1, label="goal (2 min)")
    ax.set_xticks(range(len(rows)), [r["name"].split("_")[1] for r in rows])
    ax.set_ylabel("server scan, s (red: backdoored)")
    ax.set_title("Behaviour scan before serving, per adapter (bastion serve)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path
