"""PNG plots and Markdown tables of benchmark results (serving and offline).

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


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_serving(result: Mapping[str, Any], path: str | Path) -> Path:
    """One panel per metric, one line per server, concurrency on a log2 x axis."""
    fig = _new_figure(11, 8)
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
    fig = _new_figure(10, 4.5)
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

