"""`bastion bench federated`: utility, leakage and communication of federated DP LoRA vs epsilon.

For every strategy in --strategies and every epsilon in --epsilons one full Flower
simulation runs (runner.run); its training_report.json lands in OUT/runs/<strategy>_eps<e>/
and is reused on a rerun unless --fresh. Then OUT/federated.json and OUT/federated.png hold:
  utility    held-out perplexity per owner and on the union, base vs each (strategy, eps),
             and the fraction of the non-private perplexity gain kept at each eps
  leakage    canary exposure (bits) and canary membership AUC vs eps
  bytes      upload / download per client per round vs full-model federated fine-tuning
  oracle     FLoRA stacking vs FedAvg-of-A,B aggregation error (synthetic mixed ranks and
             the real client updates of the FLoRA runs)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

_ORDER = (math.inf, 8.0, 4.0, 2.0)


def _eps_list(text: str) -> tuple[float, ...]:
    from bastion.federated.options import epsilon  # one parser: same words, same bound

    return tuple(epsilon(v) for v in text.split(","))


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bastion.federated.options import add_run_options

    p.add_argument("--out", default="bench_results/federated", help="output directory (JSON + PNG)")
    p.add_argument("--strategies", default="fedavg,ffa,flora", help="comma-separated subset of fedavg,ffa,flora")
    p.add_argument("--epsilons", type=_eps_list, default=_ORDER, help="comma-separated, e.g. inf,8,4,2")
    p.add_argument("--fresh", action="store_true", help="rerun runs whose report already exists")
    add_run_options(p)


def _same_config(rep: dict, cfg) -> bool:
    """The run was made with `cfg` (keys added to FedConfig since then take their defaults)."""
    from bastion.federated.config import FedConfig

    try:
        return FedConfig.from_record(rep["config"]) == cfg
    except (KeyError, ValueError):
        return False


def _label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def synthetic_oracle(ranks=(2, 4, 8, 16), shape=(96, 64), seed: int = 0) -> dict:
    """Mixed-rank aggregation error against sum_k p_k s_k B_k A_k (float64 oracle)."""
    import torch

    from bastion.federated import lora_math

    gen = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    clients = [{"m.lora_A.weight": torch.randn(r, in_f, generator=gen),
                "m.lora_B.weight": torch.randn(out_f, r, generator=gen)} for r in ranks]
    sizes = torch.rand(len(ranks), generator=gen) + 0.5
    weights = (sizes / sizes.sum()).tolist()
    scales = [16.0 / r for r in ranks]
    ideal = lora_math.ideal_delta(clients, scales, weights)
    stack = lora_math.flora_stack(clients, scales, weights)
    avg = lora_math.fedavg(clients, weights)
    return {"ranks": list(ranks), "flora_stack_rel_error": lora_math.relative_error(lora_math.product(stack), ideal),
            "fedavg_of_A_B_rel_error": lora_math.relative_error(lora_math.product(avg, 16.0 / max(ranks)), ideal)}


def posthoc_canary_gap(cfg, run_dir: Path, rep: dict, memo: dict) -> float | None:
    """Canary NLL-gap increase (final - base, nats, mean over owners) recomputed from the
    exported adapter, for reports written before the clients sent `canary-gap`. Same
    scoring as the ClientApps. The owners' data is rebuilt here, so first check that it is
    the data the run used: the exported adapter must reproduce every owner's reported
    final held-out perplexity (rel. 1e-3). None if it does not (the data source changed
    since the run): the gap is then unknown, never computed on other canaries."""
    from peft import PeftModel

    from bastion.federated import modeling
    from bastion.federated.client import owner_data
    from bastion.federated.train import canary_leakage, heldout_nll

    pad = modeling.load_tokenizer(cfg.model).eos_id

    def gap(model) -> float:
        vals = []
        for owner in range(cfg.clients):
            d = owner_data(cfg, owner)
            vals.append(canary_leakage(model, d.canary_prefixes, d.canary_secrets, d.reference_secrets, pad)["canary-gap"])
        return sum(vals) / len(vals)

    adapted = PeftModel.from_pretrained(modeling.load_base(cfg.model), str(run_dir)).eval()
    for owner, v in rep["utility"]["final_perplexity_per_owner"].items():
        nll, tokens = heldout_nll(adapted, owner_data(cfg, int(owner)).heldout)
        if abs(math.exp(nll / tokens) / float(v["perplexity"]) - 1) > 1e-3:
            return None
    key = (cfg.model, cfg.clients, cfg.seed, cfg.seq_len, cfg.train_records, cfg.heldout_records, cfg.canaries,
           cfg.canary_repeats, cfg.canary_refs)
    if key not in memo:
        memo[key] = gap(modeling.load_base(cfg.model))
    return gap(adapted) - memo[key]


def _summarise(strategy: str, eps: float, rep: dict) -> dict:
    util, leak, comm = rep["utility"], rep["leakage"], rep["communication"]
    per_eps = [v["epsilon_prv"] for v in rep["privacy"]["per_owner"].values()]
    agg = [r["aggregation_error"] for r in rep["rounds"] if "aggregation_error" in r]
    return {
        "strategy": strategy, "epsilon": _label(eps),
        "epsilon_prv_max": max(per_eps, key=lambda e: float(e)) if per_eps else None,
        "epsilon_rdp_max": max((v["epsilon_rdp_crosscheck"] for v in rep["privacy"]["per_owner"].values()),
                               key=lambda e: float(e), default=None),
        "base_union_ppl": util["base_union_perplexity"], "union_ppl": util["final_union_perplexity"],
        "per_owner_ppl": {o: v["perplexity"] for o, v in util["final_perplexity_per_owner"].items()},
        "base_per_owner_ppl": {o: v["perplexity"] for o, v in util["base_perplexity_per_owner"].items()},
        "exposure_bits": leak["final_mean_exposure"], "base_exposure_bits": leak["base_mean_exposure"],
        "canary_auc": leak["final_canary_auc"], "canary_gap_increase_nats": leak.get("canary_gap_increase_nats"),
        "exposure_se": leak.get("final_exposure_se"), "canary_auc_se": leak.get("final_canary_auc_se"),
        "canary_gap_increase_se": leak.get("canary_gap_increase_se"),
        "upload_bytes": comm["max_upload_bytes_per_client_round"],
        "download_bytes": comm["max_download_bytes_per_client_round"],
        "full_model_bytes": comm["full_model_bytes"],
        "upload_reduction": comm["upload_reduction_vs_full_model"],
        "aggregation_error": agg[-1] if agg else None,
        "wall_s": rep["wall_time_s"],
    }


def _gain_kept(rows: list[dict]) -> dict:
    """Fraction of the non-private union-perplexity gain (base - ppl_inf) kept at each eps."""
    out = {}
    for s in sorted({r["strategy"] for r in rows}):
        mine = {r["epsilon"]: r for r in rows if r["strategy"] == s}
        if "inf" not in mine:
            continue
        gain = mine["inf"]["base_union_ppl"] - mine["inf"]["union_ppl"]
        out[s] = {e: (r["base_union_ppl"] - r["union_ppl"]) / gain if gain > 0 else None
                  for e, r in mine.items() if e != "inf"}
    return out


def _drops_in_se(mine: list[dict], key: str, se_key: str) -> list[float] | None:
    """Each step's fall (eps loosest -> tightest) in units of its combined standard error
    sqrt(se_a^2 + se_b^2): > 2 means the drop is beyond the estimator noise (canaries)."""
    if any(r.get(key) is None or r.get(se_key) is None for r in mine):
        return None
    return [(a[key] - b[key]) / max(1e-12, math.hypot(a[se_key], b[se_key])) for a, b in zip(mine, mine[1:])]


def _monotone(rows: list[dict]) -> dict:
    """Do exposure and the canary NLL gap fall as eps tightens (inf, 8, 4, 2), per strategy?"""
    out = {}
    for s in sorted({r["strategy"] for r in rows}):
        mine = sorted((r for r in rows if r["strategy"] == s), key=lambda r: -float(r["epsilon"]))
        exp = [r["exposure_bits"] for r in mine]
        auc = [r["canary_auc"] for r in mine]
        gap = [r["canary_gap_increase_nats"] for r in mine]
        out[s] = {"order": [r["epsilon"] for r in mine], "exposure": exp,
                  "exposure_monotone_non_increasing": all(a >= b for a, b in zip(exp, exp[1:])),
                  "exposure_drops_in_se": _drops_in_se(mine, "exposure_bits", "exposure_se"),
                  "canary_auc": auc, "auc_monotone_non_increasing": all(a >= b for a, b in zip(auc, auc[1:])),
                  "auc_drops_in_se": _drops_in_se(mine, "canary_auc", "canary_auc_se"),
                  "canary_gap_increase_nats": gap,
                  "gap_monotone_non_increasing": None if None in gap else all(a >= b for a, b in zip(gap, gap[1:])),
                  "gap_drops_in_se": _drops_in_se(mine, "canary_gap_increase_nats", "canary_gap_increase_se")}
    return out


def _f(v, fmt: str = ".2f") -> str:
    return "n/a" if v is None else (v if isinstance(v, str) else format(v, fmt))


def _se(se: float | None) -> str:
    return "" if se is None else f"±{se:.3f}"


def _pm(v: float, se: float | None) -> str:
    return f"{v:.2f}" if se is None else f"{v:.2f}±{se:.2f}"


def markdown(result: dict) -> str:
    """The tables docs/FEDERATED.md records (regenerated by every bench invocation)."""
    rows, gain = result["runs"], result["gain_kept_vs_non_private"]
    out = ["| strategy | eps | eps PRV (RDP) | union ppl (base) | per-owner ppl 0/1/2/3 | gain kept | "
           "exposure bits ±se (base) | canary AUC ±se | gap increase nats ±se | up / down per client-round | wall s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = gain.get(r["strategy"], {}).get(r["epsilon"]) if r["epsilon"] != "inf" else None
        owners = "/".join(f"{r['per_owner_ppl'][o]:.1f}" for o in sorted(r["per_owner_ppl"]))
        out.append(
            f"| {r['strategy']} | {r['epsilon']} | {_f(r['epsilon_prv_max'])} ({_f(r['epsilon_rdp_max'])}) | "
            f"{r['union_ppl']:.2f} ({r['base_union_ppl']:.2f}) | {owners} | "
            f"{'-' if kept is None else f'{100 * kept:.0f}%'} | {_pm(r['exposure_bits'], r.get('exposure_se'))} "
            f"({r['base_exposure_bits']:.2f}) | {_pm(r['canary_auc'], r.get('canary_auc_se'))} | "
            f"{_f(r['canary_gap_increase_nats'], '+.3f')}{_se(r.get('canary_gap_increase_se'))} | "
            f"{r['upload_bytes'] / 1e6:.2f} / {r['download_bytes'] / 1e6:.2f} MB ({r['upload_reduction']:.0f}x up) | "
            f"{r['wall_s']:.0f} |")
    base = rows[0] if rows else None
    if base:
        out.append("\nBase model per-owner held-out perplexity 0/1/2/3: "
                   + "/".join(f"{base['base_per_owner_ppl'][o]:.1f}" for o in sorted(base["base_per_owner_ppl"]))
                   + f"; full model = {base['full_model_bytes'] / 1e6:.0f} MB per client per direction.")
    o = result["oracle_synthetic"]
    out.append(f"\nAggregation oracle (synthetic, ranks {o['ranks']}): FLoRA stack rel. error "
               f"{o['flora_stack_rel_error']:.1e}, FedAvg of A,B {o['fedavg_of_A_B_rel_error']:.2f}.")
    for r in rows:
        if r["aggregation_error"]:
            e = r["aggregation_error"]
            out.append(f"On real client updates (flora eps={r['epsilon']}, last round): stack "
                       f"{e['flora_stack']:.1e}, FedAvg of A,B (zero-padded) {e['fedavg_of_A_B']:.2f}.")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    from bastion.bench.plots import new_figure

    fig = new_figure(21, 4.5)
    axes = fig.subplots(1, 4)
    strategies = sorted({r["strategy"] for r in rows})
    xs = {e: i for i, e in enumerate(["inf", "8", "4", "2"])}
    for s in strategies:
        mine = sorted((r for r in rows if r["strategy"] == s), key=lambda r: xs.get(r["epsilon"], 9))
        x = [xs.get(r["epsilon"], len(xs)) for r in mine]
        axes[0].plot(x, [r["union_ppl"] for r in mine], marker="o", label=s)
        axes[1].plot(x, [r["exposure_bits"] for r in mine], marker="o", label=s)
        gap = [(xi, r["canary_gap_increase_nats"]) for xi, r in zip(x, mine) if r["canary_gap_increase_nats"] is not None]
        if gap:
            axes[2].plot(*zip(*gap), marker="o", label=s)
    if rows:
        axes[0].axhline(rows[0]["base_union_ppl"], color="gray", ls="--", label="base model")
        axes[1].axhline(rows[0]["base_exposure_bits"], color="gray", ls="--", label="base model")
        axes[2].axhline(0.0, color="gray", ls="--", label="no memorisation")
    for ax, title in ((axes[0], "held-out perplexity (union of owners)"), (axes[1], "canary exposure (bits)"),
                      (axes[2], "canary NLL gap increase vs base (nats)")):
        ax.set_xticks(list(xs.values()), [f"eps={k}" for k in xs])
        ax.set_title(title)
        ax.legend()
    bars = axes[3]
    per = {s: next(r for r in rows if r["strategy"] == s) for s in strategies}
    names = ["full model"] + strategies
    full = rows[0]["full_model_bytes"] if rows else 0
    up = [full] + [per[s]["upload_bytes"] for s in strategies]
    down = [full] + [per[s]["download_bytes"] for s in strategies]
    idx = range(len(names))
    bars.bar([i - 0.2 for i in idx], up, width=0.4, label="upload / client / round")
    bars.bar([i + 0.2 for i in idx], down, width=0.4, label="download / client / round")
    bars.set_yscale("log")
    bars.set_xticks(list(idx), names)
    bars.set_ylabel("bytes")
    bars.set_title("communication per round")
    bars.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args: argparse.Namespace) -> int:
    from bastion.federated.options import config_from_args
    from bastion.federated.runner import run

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    try:
        # epsilon-major: a partial (interrupted) bench still compares all strategies
        configs = [(s, e, config_from_args(args, strategy=s, epsilon=e)) for e in args.epsilons for s in strategies]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from bastion.federated.export import write_report

    out = Path(args.out)
    rows, t0, base_gap = [], time.time(), {}
    for strategy, eps, cfg in configs:
        run_dir = out / "runs" / f"{strategy}_eps{_label(eps)}"
        report_path = run_dir / "training_report.json"
        if report_path.exists() and not args.fresh and _same_config(json.loads(report_path.read_text()), cfg):
            rep = json.loads(report_path.read_text())
            print(f"[bench] reuse {run_dir}")
        else:
            print(f"[bench] {strategy} eps={_label(eps)} ...", flush=True)
            try:
                rep = run(cfg, run_dir, verbose=args.verbose)
            except (ValueError, RuntimeError, FileNotFoundError) as exc:
                print(f"error: {strategy} eps={_label(eps)}: {exc}", file=sys.stderr)
                return 1
        if (rep["leakage"].get("canary_gap_increase_nats") is None and cfg.canaries
                and "canary_gap_source" not in rep["leakage"]):
            gap = posthoc_canary_gap(cfg, run_dir, rep, base_gap)
            rep["leakage"]["canary_gap_increase_nats"] = gap
            rep["leakage"]["canary_gap_source"] = (
                "post-hoc from the exported adapter (owners' final perplexities reproduced)" if gap is not None else
                "unknown: the owners' data rebuilt now differs from the run's (perplexities not reproduced)")
            write_report(report_path, rep)  # computed once, kept with the run
        rows.append(_summarise(strategy, eps, rep))
    result = {"command": " ".join(["bastion", "bench", "federated", *sys.argv[3:]]) if sys.argv[1:3] == ["bench", "federated"] else None,
              "config": configs[0][2].to_record() if configs else None,
              "runs": rows, "gain_kept_vs_non_private": _gain_kept(rows), "leakage_monotone": _monotone(rows),
              "oracle_synthetic": synthetic_oracle(), "bench_wall_s": round(time.time() - t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    write_report(out / "federated.json", result)
    plot(rows, out / "federated.png")
    (out / "federated.md").write_text(markdown(result))
    print(json.dumps({k: result[k] for k in ("gain_kept_vs_non_private", "leakage_monotone", "oracle_synthetic")},
                     indent=1, default=str))
    print(markdown(result))
    print(f"[bench] wrote {out / 'federated.json'}, federated.png and federated.md")
    return 0


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    from bastion.federated.options import require_extra

    require_extra()
    p = subparsers.add_parser("federated", help="utility / leakage / bytes of federated DP LoRA vs epsilon",
                              description="Runs each strategy at each epsilon and writes JSON + PNG to --out.")
    add_arguments(p)
    p.set_defaults(func=main)
    return p
