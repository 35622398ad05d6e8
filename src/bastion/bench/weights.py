"""`bastion bench weights`: Bastion against llama.cpp on the same GGUF files: peak RSS,
prefill tok/s, batch-1 decode tok/s and (Bastion) batch-8 aggregate decode tok/s.

Every (engine, file, run) is one fresh child process (`python -m bastion.bench.weights
worker ...`), so its peak RSS (ru_maxrss) is that engine's alone: the model, its KV cache
and the runtime it imports. Runs alternate engines and the table reports medians; the
ratios against llama.cpp come from the same invocation. llama.cpp is llama-cpp-python
(installed for the benchmark only: docs/BENCHMARKS.md says how); without it the table
has Bastion's numbers alone. Decode feeds a fixed token cycle with EOS ignored: the cost
of a step does not depend on which token it is.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bastion.bench.weights_quality import llamacpp_available, run_json_child

# bastion: the defaults; bastion-fp32 / -int16 / -int8: --activations fp32 (exact) / int16 / int8 (opt-in;
# int16 named also takes prefill through the packed integer kernel)
ENGINES = ("bastion", "bastion-fp32", "bastion-int16", "bastion-int8", "llamacpp")
_EXTRA = {"bastion-int8": {"activations": "int8"}, "bastion-int16": {"activations": "int16"},
          "bastion-fp32": {"activations": "fp32"}}


@dataclass(frozen=True)
class WeightsBenchConfig:
    prompt_len: int = 256
    new_tokens: int = 64
    batch: int = 8
    runs: int = 3
    threads: int = 2

    def __post_init__(self) -> None:
        for name in ("prompt_len", "new_tokens", "batch", "runs", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def context(self) -> int:
        return self.prompt_len + self.new_tokens + 16


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prompt(tokenizer_encode, n: int) -> list[int]:
    text = Path("/usr/share/common-licenses/GPL-3").read_text() if Path("/usr/share/common-licenses/GPL-3").exists() \
        else " ".join(str(i) for i in range(4 * n))
    ids = tokenizer_encode(text)
    return (ids * (n // max(1, len(ids)) + 1))[:n]


# ---------------------------------------------------------------- workers (child processes)
def _bastion(model: str, cfg: WeightsBenchConfig, extra: dict[str, Any]) -> dict[str, Any]:
    import torch

    from bastion.config import CacheConfig, Config, ModelConfig, SchedulerConfig
    from bastion.engine.sampling_params import SamplingParams
    from bastion.serving.tokenizer import load_engine

    torch.set_num_threads(cfg.threads)
    blocks = -(-cfg.context // 16) * cfg.batch
    config = Config(model=ModelConfig(path=model, threads=cfg.threads, max_model_len=cfg.context + 16, **extra),
                    cache=CacheConfig(num_blocks=blocks, block_size=16, prefix_caching=False),
                    scheduler=SchedulerConfig(max_num_seqs=cfg.batch, max_num_batched_tokens=max(512, cfg.prompt_len)))
    t0 = time.perf_counter()
    engine, tok, _ = load_engine(config, show_progress=False)
    load_s = time.perf_counter() - t0
    prompt = _prompt(tok.encode, cfg.prompt_len)

    def run(n_seqs: int, plen: int, new: int, tag: str) -> tuple[float, float]:
        """(seconds for the whole run, seconds after its first step). The first step prefills
        every prompt (n_seqs * plen <= the step budget) and samples each one's first token,
        so the rest is decode alone, timed in the same run (a difference of two runs can go
        negative on a busy machine)."""
        for i in range(n_seqs):
            engine.add_request(f"{tag}{i}", prompt[i: i + plen], SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
        t = time.perf_counter()
        engine.step()
        first = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        end = time.perf_counter()
        return end - t, end - first

    run(1, 32, 4, "warm")
    prefill_s = run(1, cfg.prompt_len, 1, "p")[0]
    d1 = run(1, 16, cfg.new_tokens + 1, "d1")[1]
    d8 = run(cfg.batch, 16, cfg.new_tokens + 1, "d8")[1]
    kv_bytes = engine.kv_cache.num_blocks * engine.kv_cache.block_size * engine.kv_cache.token_bytes
    return {"load_s": load_s, "prefill_tok_s": cfg.prompt_len / prefill_s, "decode_b1_tok_s": cfg.new_tokens / d1,
            f"decode_b{cfg.batch}_tok_s": cfg.batch * cfg.new_tokens / d8, "weight_bytes": engine.weight_bytes,
            "kv_bytes": int(kv_bytes), "peak_rss_bytes": _peak_rss_bytes()}


def _llamacpp(model: str, cfg: WeightsBenchConfig, extra: dict[str, Any]) -> dict[str, Any]:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=model, n_ctx=cfg.context, n_threads=cfg.threads, n_threads_batch=cfg.threads,
                n_batch=max(512, cfg.prompt_len), verbose=False)
    load_s = time.perf_counter() - t0
    prompt = _prompt(lambda s: llm.tokenize(s.encode(), add_bos=False), cfg.prompt_len)
    llm.eval(prompt[:32])
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - t
    llm.reset()
    llm.eval(prompt[:16])
    t = time.perf_counter()
    for i in range(cfg.new_tokens):
        llm.eval([prompt[16 + i % 64]])
    d1 = time.perf_counter() - t
    return {"load_s": load_s, "prefill_tok_s": cfg.prompt_len / prefill_s, "decode_b1_tok_s": cfg.new_tokens / d1,
            "peak_rss_bytes": _peak_rss_bytes()}


def worker(engine: str, model: str, cfg: WeightsBenchConfig, extra: dict[str, Any]) -> dict[str, Any]:
    return (_llamacpp if engine == "llamacpp" else _bastion)(model, cfg, extra)


def _child(engine: str, model: str, cfg: WeightsBenchConfig, extra: dict[str, Any], timeout: float) -> dict[str, Any]:
    args = ["bastion.bench.weights", "worker", engine, model, json.dumps(asdict(cfg)), json.dumps(extra)]
    return run_json_child(args, cfg.threads, timeout)


# ---------------------------------------------------------------- the benchmark
def run_weights(models: list[str], cfg: WeightsBenchConfig, engines: tuple[str, ...] = ENGINES,
                timeout: float = 1800.0) -> dict[str, Any]:
    engines = tuple(e for e in engines if e != "llamacpp" or llamacpp_available())
    rows = []
    for model in models:
        runs: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
        for _ in range(cfg.runs):
            for e in engines:
                runs[e].append(_child(e, model, cfg, _EXTRA.get(e, {}), timeout))
        size = Path(model).stat().st_size
        for e in engines:
            ok = [r for r in runs[e] if "error" not in r]
            row: dict[str, Any] = {"model": Path(model).name, "file_bytes": size, "engine": e, "runs": len(ok)}
            if not ok:
                row["error"] = runs[e][0].get("error")
            else:
                for key in ok[0]:
                    row[key] = statistics.median(r[key] for r in ok)
            rows.append(row)
    for row in rows:  # ratios against llama.cpp on the same file
        ref = next((r for r in rows if r["model"] == row["model"] and r["engine"] == "llamacpp" and "error" not in r), None)
        if ref is not None and "error" not in row and row["engine"] != "llamacpp":
            for key in ("prefill_tok_s", "decode_b1_tok_s"):
                row[f"{key}_vs_llamacpp"] = row[key] / ref[key]
            row[f"decode_b{cfg.batch}_vs_llamacpp_b1"] = row.get(f"decode_b{cfg.batch}_tok_s", 0) / ref["decode_b1_tok_s"]
            row["peak_rss_vs_llamacpp"] = row["peak_rss_bytes"] / ref["peak_rss_bytes"]
        if row["engine"].startswith("bastion") and "error" not in row:  # the memory goal
            row["rss_budget_bytes"] = 1.3 * row["file_bytes"] + row["kv_bytes"] + 300 * 2**20
    return {"config": asdict(cfg), "engines": list(engines), "machine": _machine(), "rows": rows}


def _machine() -> dict[str, Any]:
    import platform

    flags = ""
    try:
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "avx512": "avx512f" in flags, "avx512_vnni": "avx512_vnni" in flags}


def table(result: dict[str, Any]) -> str:
    b = result["config"]["batch"]
    gb = lambda x: f"{x / 2**30:.2f}"  # noqa: E731
    lines = [f"| file | engine | file GB | peak RSS GB | RSS goal GB | prefill tok/s | decode b1 tok/s | decode b{b} tok/s "
             f"| b1 vs llama.cpp | b{b} vs llama.cpp b1 | prefill vs llama.cpp |", "|" + "---|" * 11]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['engine']} | {gb(r['file_bytes'])} | error: {r['error']} |" + " |" * 7)
            continue
        f = lambda k, fmt="{:.1f}": fmt.format(r[k]) if k in r else "—"  # noqa: E731
        lines.append(f"| {r['model']} | {r['engine']} | {gb(r['file_bytes'])} | {gb(r['peak_rss_bytes'])} | "
                     f"{gb(r['rss_budget_bytes']) if 'rss_budget_bytes' in r else '—'} | {f('prefill_tok_s')} | "
                     f"{f('decode_b1_tok_s')} | {f(f'decode_b{b}_tok_s')} | {f('decode_b1_tok_s_vs_llamacpp', '{:.2f}x')} | "
                     f"{f(f'decode_b{b}_vs_llamacpp_b1', '{:.2f}x')} | {f('prefill_tok_s_vs_llamacpp', '{:.2f}x')} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    from bastion.bench.plots import new_figure

    fig = new_figure(12, 4)
    axes = fig.subplots(1, 3)
    rows = [r for r in result["rows"] if "error" not in r]
    labels = [f"{r['model'][:18]}\n{r['engine']}" for r in rows]
    for ax, key, title in zip(axes, ("peak_rss_bytes", "decode_b1_tok_s", "prefill_tok_s"),
                              ("peak RSS (GB)", "decode batch 1 (tok/s)", "prefill (tok/s)")):
        vals = [r[key] / (2**30 if key == "peak_rss_bytes" else 1) for r in rows]
        ax.bar(range(len(rows)), vals, color=[{"bastion": "C0", "llamacpp": "C1"}.get(r["engine"], "C2") for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    return path


def add_bench_parser(subparsers: Any) -> None:
    w = subparsers.add_parser("weights", help="quantized weights: peak RSS, prefill and decode vs llama.cpp on the same GGUFs")
    w.add_argument("--models", default="", help="comma list of GGUF files (default: the embedded SmolLM2 Q4_1); "
                   "make large random ones with `python -m bastion.bench.gguf_gen --shape 1b --out F`")
    w.add_argument("--engines", default="", help=f"comma list of {ENGINES} (default: all); with --quality of "
                   "QUALITY_ENGINES (hf-fp32, hf-bf16 and these)")
    w.add_argument("--quality", action="store_true", help="instead of speed: perplexity (vs llama.cpp), top-1 and "
                   "greedy chat agreement (vs HF transformers) of each engine on the same file")
    w.add_argument("--windows", type=int, default=4, help="--quality: text windows scored")
    w.add_argument("--window", type=int, default=512, help="--quality: tokens per window")
    w.add_argument("--prompt-len", type=int, default=256)
    w.add_argument("--new-tokens", type=int, default=64)
    w.add_argument("--batch", type=int, default=8)
    w.add_argument("--runs", type=int, default=3)
    w.add_argument("--threads", type=int, default=2)
    w.add_argument("--out", default="bench_results/weights")
    w.set_defaults(func=run_weights_cmd)


def run_weights_cmd(args: Any) -> int:
    from bastion.bench.report import write_report
    from bastion.engine.models.loader import embedded_model_path

    from bastion.bench.weights_quality import QUALITY_ENGINES

    known = QUALITY_ENGINES if args.quality else ENGINES
    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip()) or known
    models = [m.strip() for m in args.models.split(",") if m.strip()] or [str(embedded_model_path())]
    bad = [e for e in engines if e not in known] + [m for m in models if not Path(m).is_file()]
    if args.quality and not bad:
        return _quality_cmd(args, models, engines)
    try:
        cfg = WeightsBenchConfig(args.prompt_len, args.new_tokens, args.batch, args.runs, args.threads)
    except ValueError as exc:
        bad.append(str(exc))
    if bad or not engines:
        print(f"error: not usable: {bad or 'no engines'} (engines: {known}; models: existing GGUF files)", file=sys.stderr)
        return 2
    if "llamacpp" in engines and not llamacpp_available():
        print("note: llama-cpp-python is not installed; measuring Bastion alone (docs/BENCHMARKS.md says how to "
              "install it)", file=sys.stderr)
    result = run_weights(models, cfg, engines)
    write_report(Path(args.out), "weights", result, table(result), plot)
    return 0


def _quality_cmd(args: Any, models: list[str], engines: tuple[str, ...]) -> int:
    from bastion.bench.report import write_report
    from bastion.bench.weights_quality import QualityConfig, quality_plot, quality_table, run_quality

    try:
        cfg = QualityConfig(windows=args.windows, window=args.window, threads=args.threads)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run_quality(models, cfg, engines)
    write_report(Path(args.out), "weights_quality", result, quality_table(result), quality_plot)
    return 0


if __name__ == "__main__" and len(sys.argv) >= 6 and sys.argv[1] == "worker":
    res = worker(sys.argv[2], sys.argv[3], WeightsBenchConfig(**json.loads(sys.argv[4])), json.loads(sys.argv[5]))
    print(json.dumps(res))
