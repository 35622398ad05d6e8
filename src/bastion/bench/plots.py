"""PNG plots and Markdown tables of benchmark results (serving, offline, kv-quality).

Uses matplotlib's object API (`Figure` + Agg canvas) rather than pyplot, so plotting
changes no process-wide backend or figure registry: safe inside a server or a test.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

# (metric key, axis title, log scale)
_SERVING_PANELS = (
    ("output_tok_s", "output tokens/s (aggregate)", False),
    ("request_s", "requests/s", False),
    ("ttft_p50_ms", "TTFT p50 (ms)", True),
    ("itl_p50_ms", "inter-token latency p50 (ms)", True),
)
_OFFLINE_METRICS = (
    ("prefill_tok_s", "prefill tok/s (batch 1)"),
    ("decode_b1_tok_s", "decode tok/s, batch 1"),
    ("decode_b8_tok_s", "decode tok/s, batch 8 (total)"),
)


def new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_serving(result: Mapping[str, Any], path: str | Path) -> Path:
    """One panel per metric, one line per server, concurrency on a log2 x axis."""
    fig = new_figure(11, 8)
    axes = fig.subplots(2, 2).ravel()
    medians: Mapping[str, Mapping[str, Mapping[str, Any]]] = result["medians"]
    for ax, (key, title, log_y) in zip(axes, _SERVING_PANELS):
        for name, levels in medians.items():
            pts = sorted((int(c), m[key]) for c, m in levels.items() if m.get(key) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        levels = sorted({int(c) for lv in medians.values() for c in lv})
        ax.set_xticks(levels, [str(c) for c in levels])  # "16", not "2^4"
        ax.minorticks_off()
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("concurrent requests")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    w = result.get("workload", {})
    fig.suptitle(f"bastion bench serving: prompt ~{w.get('input_len')} tok, "
                 f"output ~{w.get('output_len')} tok, medians of {result['config']['repeats']} runs")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def plot_offline(result: Mapping[str, Any], path: str | Path) -> Path:
    """Grouped bars: one group per metric, one bar per engine."""
    engines: Mapping[str, Mapping[str, Any]] = result["medians"]
    names = list(engines)
    fig = new_figure(10, 4.5)
    axes = fig.subplots(1, len(_OFFLINE_METRICS))
    for ax, (key, title) in zip(axes, _OFFLINE_METRICS):
        vals = [engines[n].get(key) or 0.0 for n in names]
        bars = ax.bar(range(len(names)), vals, color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"bastion bench offline: {result['prompt_len']}-token prompt, "
                 f"{result['new_tokens']} new tokens, {result['threads']} threads, "
                 f"medians of {result['runs']} runs")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def _fmt(x: Any, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def serving_table(result: Mapping[str, Any]) -> str:
    """Markdown: one row per server and level, plus the reference's ratio vs each peer."""
    lines = ["| server | concurrency | out tok/s | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | runs |",
             "|---|---|---|---|---|---|---|"]
    for name, levels in result["medians"].items():
        for c in sorted(levels, key=int):
            m = levels[c]
            lines.append(f"| {name} | {c} | {_fmt(m.get('output_tok_s'))} | {_fmt(m.get('request_s'), 2)} | "
                         f"{_fmt(m.get('ttft_p50_ms'), 0)} / {_fmt(m.get('ttft_p99_ms'), 0)} | "
                         f"{_fmt(m.get('itl_p50_ms'))} / {_fmt(m.get('itl_p99_ms'))} | {m.get('runs')} |")
    ref = result["reference"]
    for peer, levels in result.get("ratios", {}).items():
        lines += ["", f"{ref} vs {peer} (> 1: {ref} better)", "",
                  "| concurrency | out tok/s | req/s | TTFT p50 | ITL p50 |", "|---|---|---|---|---|"]
        for c in sorted(levels, key=int):
            r = levels[c]
            lines.append(f"| {c} | " + " | ".join(
                _fmt(r.get(k), 2) + "×" if r.get(k) else "–"
                for k in ("output_tok_s", "request_s", "ttft_p50_ms", "itl_p50_ms")) + " |")
    return "\n".join(lines)


def offline_table(result: Mapping[str, Any]) -> str:
    lines = ["| engine | prefill tok/s | decode tok/s b1 | decode tok/s b8 (total) | runs |",
             "|---|---|---|---|---|"]
    for name, m in result["medians"].items():
        lines.append(f"| {name} | {_fmt(m.get('prefill_tok_s'))} | {_fmt(m.get('decode_b1_tok_s'))} | "
                     f"{_fmt(m.get('decode_b8_tok_s'))} | {result['runs']} |")
    ratios: Mapping[str, Mapping[str, float]] = result.get("ratios", {})
    if ratios:
        ref = result["reference"]
        lines += ["", f"{ref} / engine (> 1: {ref} faster)", "",
                  "| vs | prefill | decode b1 | decode b8 |", "|---|---|---|---|"]
        for name, r in ratios.items():
            lines.append(f"| {name} | " + " | ".join(
                _fmt(r.get(k), 2) + "×" if r.get(k) else "–"
                for k in ("prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s")) + " |")
    return "\n".join(lines)


def format_level_line(name: str, rep: int, s: Mapping[str, Any]) -> str:
    """One progress line per (server, level, repeat) while a serving bench runs."""
    return (f"[{name} c={s['concurrency']} run {rep + 1}] {s['completed']}/{s['requests']} ok, "
            f"{s['output_tok_s']:.1f} out tok/s, {s['request_s']:.2f} req/s, "
            f"TTFT p50/p99 {_fmt(s['ttft_p50_ms'])}/{_fmt(s['ttft_p99_ms'])} ms, "
            f"ITL p50/p99 {_fmt(s['itl_p50_ms'])}/{_fmt(s['itl_p99_ms'])} ms"
            + (f", {s['short_outputs']} SHORT outputs" if s.get("short_outputs") else "")
            + (f", errors: {s['errors']}" if s.get("errors") else ""))


# ---------------------------------------------------------------- kv-quality

def _settings(o: dict | None) -> str:
    if not o:
        return "–"
    return (f"G{o['group_size']}" + (f" Gv{o['value_group']}" if o.get("value_group") else "")
            + f" R{o['residual']} S{o['sink']}" + (" had" if o.get("hadamard") else "")
            + (" clip" if o.get("clip") else ""))


def kv_quality_table(result: dict) -> str:
    rows = result["rows"] + result.get("peer_rows", [])
    lines = [f"Teacher forcing, {result['config']['steps']} decode steps; delta vs the {result['reference']} "
             "cache (peers: vs HF fp32 DynamicCache); bytes incl. fp16 window, sink and scales", "",
             "| config | settings | ctx | PPL | ΔPPL % | top-1 | KL | bytes/token | vs fp16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ppl" in r:
            lines.append(f"| {r['config']} | {_settings(r.get('options'))} | {r['ctx']} | {r['ppl']:.3f} | "
                         f"{r['delta_ppl_pct']:+.2f} | {r['top1_agreement']:.3f} | {r['kl']:.2e} | "
                         f"{r['bytes_per_token']:.0f} | {r['ratio_vs_fp16']:.2f}× |")
    pk = [r for r in rows if "passkey" in r]
    if pk:
        ctxs = sorted({r["ctx"] for r in pk})
        lines += ["", "Passkey retrieval (greedy, success over depths)", "",
                  "| config | " + " | ".join(f"ctx {c}" for c in ctxs) + " |", "|---|" + "---|" * len(ctxs)]
        for name in dict.fromkeys(r["config"] for r in pk):
            got = {r["ctx"]: r for r in pk if r["config"] == name}
            lines.append(f"| {name} | " + " | ".join(
                f"{sum(h['ok'] for h in got[c]['passkey'])}/{len(got[c]['passkey'])}" if c in got else "–"
                for c in ctxs) + " |")
    return "\n".join(lines)


def plot_kv_quality(result: dict, path: Any) -> None:
    fig = new_figure(12, 5)
    ax1, ax2 = fig.subplots(1, 2)
    rows = [r for r in result["rows"] + result.get("peer_rows", []) if "ppl" in r and r["config"] != "fp32"]
    ctxs = sorted({r["ctx"] for r in rows})
    names = list(dict.fromkeys(r["config"] for r in rows))
    markers = "osD^v<>"
    for r in rows:
        c, m = f"C{names.index(r['config']) % 10}", markers[ctxs.index(r["ctx"]) % len(markers)]
        ax1.scatter(r["bytes_per_token"], max(r["delta_ppl_pct"], 1e-3), color=c, marker=m)
        ax2.scatter(r["bytes_per_token"], r["top1_agreement"], color=c, marker=m)
    for n in names:
        ax1.scatter([], [], color=f"C{names.index(n) % 10}", label=n)
    for i, c in enumerate(ctxs):
        ax2.scatter([], [], color="k", marker=markers[i % len(markers)], label=f"ctx {c}")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("KV bytes per token (all layers, incl. window/sink/scales)")
        ax.grid(True, alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("ΔPPL % vs fp32 cache (floored at 1e-3)")
    ax2.set_ylabel("top-1 agreement")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle("bastion bench kv-quality: quality vs KV bytes")
    fig.tight_layout()
    fig.savefig(path)
