"""Weight statistics of a LoRA adapter: ΔW = s·B·A per module, without forming ΔW.

With thin QR factorisations Aᵀ = Q_A R_A and B = Q_B R_B (Q orthonormal, R r×r),
    ΔW = s · Q_B (R_B R_Aᵀ) Q_Aᵀ,
so ΔW has exactly the singular values of the r×r core C = s·R_B R_Aᵀ: the Frobenius norm
‖ΔW‖_F = ‖C‖_F (equivalently s²·tr(BᵀB·AAᵀ), the trace of small Gram matrices), the
spectral norm σ₁ and the concentration σ₁²/Σσ² all cost O((in+out)·r²) instead of
O(in·out·r), in float64.

Thresholds are calibrated on a cohort of clean adapters (docs/SECURITY.md, "Calibration");
the numbers in `WeightThresholds` come from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WeightThresholds:
    """Judged per module (relative norm) and per adapter (spread across layers).
    rel = ‖ΔW‖_F / ‖W‖_F needs the base weights' norms (BaseModelInfo.weight_norms);
    without them the absolute ‖ΔW‖_F limits apply."""
    # clean cohort (docs/SECURITY.md): max rel 0.091 (the 300-step adapter), 0.053 at 120 steps
    rel_norm_warn: float = 0.25
    rel_norm_fail: float = 0.5            # half the base weight: the update rewrites the layer
    # SmolLM2-135M fallback when base norms are unknown: clean max ‖ΔW‖_F 8.9
    abs_norm_warn: float = 24.0
    abs_norm_fail: float = 64.0
    layer_ratio_warn: float = 10.0        # max/median per-layer norm in one module type (clean max 3.8)
    layer_share_warn: float = 0.5         # one layer's share of total ΔW energy (clean max 0.22; >= 3x uniform)
    min_layers_for_spread: int = 8
    scale_warn: float = 64.0              # lora_alpha / r (or / sqrt(r) with rsLoRA)


@dataclass
class ModuleStats:
    layer: int
    module: str
    rank: int
    scale: float
    fro: float
    sigma1: float
    concentration: float    # σ₁² / Σσ² in [1/r, 1]; 0 for a zero update
    effective_rank: float   # exp(entropy of σ²/Σσ²)
    rel: float | None       # fro / ‖W‖_F of the base module, when known

    def to_dict(self) -> dict:
        return {k: (float(f"{v:.7g}") if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def module_stats(a: np.ndarray, b: np.ndarray, scale: float, layer: int, module: str,
                 base_norm: float | None = None) -> ModuleStats:
    """a: [r, in], b: [out, r] (float64)."""
    r = a.shape[0]
    _, ra = np.linalg.qr(a.T)       # [r, r]
    _, rb = np.linalg.qr(b)         # [r, r]
    sv = np.linalg.svd(scale * rb @ ra.T, compute_uv=False)
    energy = float(np.sum(sv ** 2))
    fro = math.sqrt(energy)
    if energy > 0:
        p = sv ** 2 / energy
        p = p[p > 0]
        conc, eff = float(sv[0] ** 2 / energy), float(math.exp(-np.sum(p * np.log(p))))
    else:
        conc, eff = 0.0, 0.0
    rel = fro / base_norm if base_norm else None
    return ModuleStats(layer, module, r, scale, fro, float(sv[0]), conc, eff, rel)


def summarize(stats: list[ModuleStats]) -> dict:
    """Adapter-level numbers the thresholds are judged on (and that calibration records)."""
    if not stats:
        return {}
    use_rel = all(s.rel is not None for s in stats)
    val = (lambda s: s.rel) if use_rel else (lambda s: s.fro)
    out: dict = {"metric": "rel" if use_rel else "abs", "modules": len(stats)}
    worst = max(stats, key=val)
    out["max_norm"] = val(worst)
    out["max_norm_at"] = f"layers.{worst.layer}.{worst.module}"
    out["median_norm"] = float(np.median([val(s) for s in stats]))
    out["max_fro"] = max(s.fro for s in stats)
    out["max_sigma1"] = max(s.sigma1 for s in stats)
    nz = [s for s in stats if s.fro > 0]
    out["median_concentration"] = float(np.median([s.concentration for s in nz])) if nz else 0.0
    out["max_concentration"] = max((s.concentration for s in nz), default=0.0)
    out["median_effective_rank"] = float(np.median([s.effective_rank for s in nz])) if nz else 0.0
    # spread across layers, per module type
    ratios = {}
    for m in sorted({s.module for s in stats}):
        vals = sorted(((s.layer, val(s)) for s in stats if s.module == m))
        if len(vals) >= 2:
            med = float(np.median([v for _, v in vals]))
            top_layer, top = max(vals, key=lambda lv: lv[1])
            ratios[m] = {"max_over_median": top / med if med > 0 else (math.inf if top > 0 else 1.0),
                         "layer": top_layer, "layers": len(vals)}
    out["layer_ratio"] = ratios
    out["max_layer_ratio"] = max((r["max_over_median"] for r in ratios.values()), default=1.0)
    energy: dict[int, float] = {}
    for s in stats:
        energy[s.layer] = energy.get(s.layer, 0.0) + val(s) ** 2
    total = sum(energy.values())
    top_layer = max(energy, key=energy.get)
    out["layers"] = len(energy)
    out["top_layer"] = top_layer
    out["top_layer_share"] = energy[top_layer] / total if total > 0 else 0.0
    return out


def judge(stats: list[ModuleStats], summary: dict, t: WeightThresholds) -> list[tuple[str, str, str, dict]]:
    """(check, severity, message, details) findings from the calibrated thresholds."""
    if not stats:
        return []
    out = []
    rel = summary["metric"] == "rel"
    warn, fail = (t.rel_norm_warn, t.rel_norm_fail) if rel else (t.abs_norm_warn, t.abs_norm_fail)
    what = "‖ΔW‖_F/‖W‖_F" if rel else "‖ΔW‖_F"
    val = (lambda s: s.rel) if rel else (lambda s: s.fro)
    big = sorted((s for s in stats if val(s) >= warn), key=val, reverse=True)
    if big:
        sev = "fail" if val(big[0]) >= fail else "warn"
        names = ", ".join(f"layers.{s.layer}.{s.module}={val(s):.3g}" for s in big[:5])
        out.append(("weights.norm", sev,
                    f"{len(big)} module(s) with {what} >= {warn:g} (fail at {fail:g}): {names}",
                    {"metric": what, "warn": warn, "fail": fail,
                     "modules": [s.to_dict() for s in big[:20]]}))
    if summary["layers"] >= t.min_layers_for_spread:
        worst = max(summary["layer_ratio"].items(), key=lambda kv: kv[1]["max_over_median"], default=None)
        if worst and worst[1]["max_over_median"] >= t.layer_ratio_warn:
            out.append(("weights.layer_spread", "warn",
                        f"{worst[0]} in layer {worst[1]['layer']} has {worst[1]['max_over_median']:.3g}x the "
                        f"median layer's {what} (threshold {t.layer_ratio_warn:g}): a single-layer outlier",
                        {"module": worst[0], **worst[1]}))
        share_warn = max(t.layer_share_warn, 3.0 / summary["layers"])  # 3x a uniform share at least
        if summary["top_layer_share"] >= share_warn:
            out.append(("weights.layer_spread", "warn",
                        f"layer {summary['top_layer']} carries {summary['top_layer_share']:.0%} of the adapter's "
                        f"ΔW energy over {summary['layers']} layers (threshold {share_warn:.0%})",
                        {"layer": summary["top_layer"], "share": summary["top_layer_share"]}))
    return out
