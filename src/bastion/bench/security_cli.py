"""`bastion bench security` on the command line: the cohort benchmark (security.py) or,
with --held-out, the random-trigger cohort (security_heldout.py). Its own module so that
neither of those two imports the other's caller."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bastion.bench import security_cohort as sc
from bastion.bench.security import DEFAULT_EXTRA_CLEAN, run_security
from bastion.bench.security_report import markdown


def add_security_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("security", help="LoRA security benchmark: backdoor ASR, utility, gate TPR/FPR",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--cohort", choices=tuple(sc.COHORTS), default="small", help="small (CI, ~minutes) or full")
    p.add_argument("--out", default="bench_results/security", help="output directory (cohort kept there)")
    p.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts per adapter (small 16, full 32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--extra-clean", action="append", default=None, metavar="DIR",
                   help="directory of more clean adapters for the FPR (default: the weight calibration's, if present)")
    p.add_argument("--battery-seed", type=int, default=0,
                   help="seed of the probe battery's licence excerpts (the gate's default is 0; others test "
                        "how much the numbers depend on the excerpts)")
    p.add_argument("--held-out", action="store_true",
                   help="the held-out cohort instead: random triggers, tasks outside the probe battery, thresholds "
                        "tuned on seed 0 and reported on --seeds (security_heldout.py)")
    p.add_argument("--seeds", default="0,1,2", help="held-out cohort seeds (the first is the tuning seed)")
    p.add_argument("--size", default=None, metavar="B,C",
                   help="held-out cohort size per reported seed: backdoored,clean (default 12,12)")
    p.add_argument("--no-search", action="store_true",
                   help="held-out cohort: scan without the trigger search (its 30 s budget; the TPR/FPR "
                        "reported are the inversion's either way)")
    p.add_argument("--no-battery", action="store_true",
                   help="held-out cohort: scan without the probe battery (~36 s per adapter), which the gate runs "
                        "on every load and whose prompts join the task-prompt pool")
    p.add_argument("--server", action="store_true",
                   help="held-out cohort: load each adapter into a running `bastion serve` and time its whole "
                        "scan as the server runs it (the last seed of --seeds, --size B,C; default 2,2)")
    p.set_defaults(func=run_security_cmd)
    return p


def run_security_cmd(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.held_out and args.server:
        from bastion.bench.report import write_report
        from bastion.bench.security_server import plot, run_server_scans, table

        size = tuple(int(x) for x in args.size.split(",")) if args.size else (2, 2)
        out = Path(args.out if args.out != "bench_results/security" else "bench_results/security_server")
        res = run_server_scans(out, int(args.seeds.split(",")[-1]), size, threads=args.threads or 2)
        write_report(out, "server_scans", res, table(res), plot)
        return 0
    if args.held_out:
        from bastion.bench.security_heldout import run_heldout

        seeds = tuple(int(x) for x in args.seeds.split(","))
        size = tuple(int(x) for x in args.size.split(",")) if args.size else None
        out = Path(args.out if args.out != "bench_results/security" else "bench_results/security_heldout")
        res = run_heldout(out, seeds, tune_seed=seeds[0], threads=args.threads, size=size,
                          search=not args.no_search, battery=not args.no_battery)
        print(json.dumps(res["summary"], indent=2))
        print(f"wrote {out}/heldout.json, heldout.png")
        return 0
    n_eval = args.eval_prompts or (16 if args.cohort == "small" else 32)
    extra = args.extra_clean if args.extra_clean is not None else \
        (list(DEFAULT_EXTRA_CLEAN) if args.cohort == "full" else [])
    res = run_security(Path(args.out), args.cohort, n_eval=n_eval, threads=args.threads, extra_dirs=extra,
                       battery_seed=args.battery_seed)
    print(markdown(res))
    print(f"wrote {args.out}/security.json, security.md, security.png")
    return 0 if res["summary"]["artifacts_refused"] == 1.0 else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="bastion bench")
    add_security_parser(ap.add_subparsers(dest="command", required=True))
    a = ap.parse_args(["security", *sys.argv[1:]])
    sys.exit(a.func(a))
