"""argparse wiring for `bastion finetune federated` (src/bastion/cli.py calls
`add_finetune_parser(finetune_subparsers)`; it sets `func(args) -> int`, the exit code).
The options it shares with `bastion bench federated` are in options.py."""

from __future__ import annotations

import argparse
import sys

from bastion.federated.config import STRATEGIES
from bastion.federated.options import DEFAULTS, add_run_options, config_from_args, epsilon, require_extra

def _finetune(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from bastion.federated.runner import run

    try:
        report = run(cfg, args.out, verbose=args.verbose)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    eps = report["privacy"]["per_owner"]
    util = report["utility"]
    print(f"adapter: {args.out}  (report: {args.out}/training_report.json)")
    print(f"held-out perplexity (union of owners): base {util['base_union_perplexity']:.2f} -> "
          f"{util['final_union_perplexity']:.2f}")
    for owner, e in eps.items():
        print(f"owner {owner}: epsilon {float(e['epsilon_prv']):.2f} (PRV; RDP cross-check "
              f"{float(e['epsilon_rdp_crosscheck']):.2f}) at delta {e['delta']:.2e}")
    print(f"protects: {report['privacy']['protects']['records']}")
    return 0


def add_finetune_parser(subparsers) -> argparse.ArgumentParser:
    require_extra()
    p = subparsers.add_parser(
        "federated", help="federated DP LoRA fine-tuning across data owners (Flower simulation)",
        description="Train one LoRA adapter across data owners with Flower; each owner runs DP-SGD "
                    "(Opacus) on its own text. Writes a PEFT adapter and training_report.json to --out.")
    p.add_argument("--strategy", choices=STRATEGIES, default=DEFAULTS["strategy"],
                   help="fedavg: FedAvg of A and B (FedIT); ffa: FFA-LoRA (A frozen); flora: stacking")
    p.add_argument("--epsilon", type=epsilon, default=DEFAULTS["epsilon"],
                   help="per-owner record-level epsilon (delta = 1/n); 'inf' disables DP")
    p.add_argument("--client-dp-noise", type=float, default=0.0,
                   help="client-level DP noise multiplier via Flower's server-side clipping (fedavg/ffa)")
    p.add_argument("--client-clip", type=float, default=DEFAULTS["client_clip"])
    p.add_argument("--export-rank", type=int, default=0,
                   help="flora: SVD-truncate the exported adapter to this rank (0: exact stacked rank)")
    p.add_argument("--out", required=True, metavar="ADAPTER_DIR", help="output adapter directory")
    add_run_options(p)
    p.set_defaults(func=_finetune)
    return p
