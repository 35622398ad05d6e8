"""`bastion bench kv-memory`: what a quantized KV cache does to speed and capacity.

(a) Decode-step latency vs context length: one request, its prompt (real licence text)
    prefilled, then `steps` (>= 64) timed engine steps of one decode each; p50 and p99
    per config and context. A KIVI cache quantizes a G-token group every G steps, so a
    flush spike would show in p99.
(b) Fixed KV byte budget (`kv_memory_gb`): the tokens the block manager can hold
    (blocks x block size; KIVI's per-sequence fp windows are charged to the same budget
    for max_num_seqs = batch), the largest batch of prompt_len + new_tokens requests
    that fits without preemption, and aggregate decode tokens/s over a batch-size sweep
    (all requests submitted at once, greedy, EOS ignored; decode rate = tokens generated
    after the last prompt finished prefilling / that time).

The model runs in the served dtype (bfloat16 by default). Timings are only meaningful
on an idle machine.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from bastion.bench.kv_quality import TEXT_DIR, EngineMaker, KVVariant, corpus_text, single_sequence_cache

DEFAULT_VARIANTS = (
    KVVariant("bf16", "bf16"),
    KVVariant("fp16", "fp16"),
    KVVariant("int8", "int8"),
    KVVariant("kivi4", "kivi4"),
    KVVariant("kivi2", "kivi2"),
    KVVariant("kivi", "kivi"),
)


@dataclass(frozen=True)
class KVMemoryConfig:
    contexts: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    steps: int = 64
    kv_memory_gb: float = 0.05
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    prompt_len: int = 512
    new_tokens: int = 64
    dtype: str = "bfloat16"
    max_model_len: int = 8192
    threads: int = 2
    text_dir: str = TEXT_DIR
    model: str | None = None
    variants: tuple[KVVariant, ...] = DEFAULT_VARIANTS

    def __post_init__(self) -> None:
        for name in ("steps", "prompt_len", "new_tokens", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.new_tokens < 2:
            raise ValueError("new_tokens must be >= 2 (decode rate needs a decode phase)")
        if any(b < 1 for b in self.batches) or any(c < 1 for c in self.contexts):
            raise ValueError("batches and contexts must be >= 1")
        if self.kv_memory_gb <= 0:
            raise ValueError("kv_memory_gb must be > 0")


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def decode_latency(engine: Any, prompt: list[int], steps: int) -> list[float]:
    """Seconds of each of `steps` one-decode engine steps after the prompt is prefilled."""
    from bastion.engine.sampling_params import SamplingParams

    engine.add_request(f"lat-{time.monotonic_ns()}", prompt, SamplingParams(max_tokens=steps + 1, temperature=0.0,
                                                                           ignore_eos=True))
    while not any(o.new_token_ids for o in engine.step()):  # prefill (chunked) until the first token
        pass
    times = []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return times


def _run_batch(engine: Any, prompts: list[list[int]], new_tokens: int) -> float:
    from bastion.engine.sampling_params import SamplingParams

    p = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(f"b{time.monotonic_ns()}-{i}", ids, p)
    t = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - t


def batch_decode_rate(engine: Any, prompts: list[list[int]], new_tokens: int) -> dict:
    """All prompts submitted at once, run to the end twice: with 1 and with new_tokens
    output tokens each. Decode tok/s = batch * (new_tokens - 1) / (t_n - t_1): the
    prefill (chunked, interleaved with decodes) cancels out, whatever the prompt length
    (prefix caching is off, so the second run prefills again)."""
    b = len(prompts)
    before = engine.scheduler.num_preemptions
    t1 = _run_batch(engine, prompts, 1)
    tn = _run_batch(engine, prompts, new_tokens)
    dec = b * (new_tokens - 1)
    return {"decode_tok_s": dec / (tn - t1) if tn > t1 else None, "decode_tokens": dec,
            "total_tok_s": b * new_tokens / tn, "t_first_token_s": t1, "t_total_s": tn,
            "preemptions": engine.scheduler.num_preemptions - before}


def run_kv_memory(cfg: KVMemoryConfig, maker: EngineMaker | None = None, log: Callable[[str], None] = print) -> dict:
    """`maker` must build engines of cfg.dtype and cfg.max_model_len (default: one is made here)."""
    maker = maker or EngineMaker(cfg.model, cfg.dtype, cfg.max_model_len, cfg.threads)
    latency: dict[str, dict[str, dict]] = {}
    capacity: dict[str, dict] = {}
    sweep: dict[str, dict[str, dict]] = {}
    corpus: list[int] | None = None
    for v in cfg.variants:
        # (a) one sequence of up to max_model_len tokens
        engine = maker.make(single_sequence_cache(v, cfg.max_model_len), max_num_seqs=1)
        if corpus is None:
            corpus = maker.tokenizer.encode(corpus_text(cfg.text_dir), add_special_tokens=False)
        latency[v.name] = {}
        for ctx in cfg.contexts:
            c = min(ctx, cfg.max_model_len - cfg.steps - 1)
            ts = [t * 1e3 for t in decode_latency(engine, corpus[:c], cfg.steps)]
            latency[v.name][str(c)] = {"p50_ms": statistics.median(ts), "p99_ms": _percentile(ts, 99),
                                       "max_ms": max(ts), "mean_ms": statistics.fmean(ts), "steps": len(ts)}
            log(f"[{v.name} latency ctx={c}] p50 {latency[v.name][str(c)]['p50_ms']:.1f} ms, "
                f"p99 {latency[v.name][str(c)]['p99_ms']:.1f} ms, max {max(ts):.1f} ms")
        # (b) fixed byte budget: capacity, then the batch sweep
        sweep[v.name] = {}
        best = None
        per_req = cfg.prompt_len + cfg.new_tokens
        for b in cfg.batches:
            try:
                engine = maker.make(v.cache_config(kv_memory_gb=cfg.kv_memory_gb), max_num_seqs=b)
            except ValueError as exc:  # the budget cannot even hold b fp windows
                log(f"[{v.name} batch={b}] skipped: {exc}")
                break
            bm = engine.block_manager
            tokens = bm.num_blocks * bm.block_size  # KIVI: fp windows of b sequences already charged
            fits = tokens // (bm.blocks_needed(per_req) * bm.block_size)
            cap = capacity.setdefault(v.name, {"budget_gb": cfg.kv_memory_gb, "tokens": tokens,
                                               "token_bytes": engine.kv_cache.token_bytes, "max_batch": 0,
                                               "tokens_by_batch": {}, "requests_fit_by_batch": {},
                                               "reserved_bytes_by_batch": {}})
            cap["tokens_by_batch"][str(b)] = tokens
            cap["requests_fit_by_batch"][str(b)] = fits
            cap["reserved_bytes_by_batch"][str(b)] = getattr(engine.kv_cache, "reserved_bytes", 0)
            if b > fits:
                log(f"[{v.name} batch={b}] {tokens} tokens hold only {fits} requests of {per_req}: stop")
                break
            cap["max_batch"] = b
            prompts = [corpus[i * 97 : i * 97 + cfg.prompt_len] for i in range(b)]
            r = batch_decode_rate(engine, prompts, cfg.new_tokens)
            sweep[v.name][str(b)] = r
            log(f"[{v.name} batch={b}] {r['decode_tok_s'] or 0:.1f} decode tok/s, {tokens} tokens in budget, "
                f"{r['preemptions']} preemptions")
            if r["decode_tok_s"] and (best is None or r["decode_tok_s"] > best[1]):
                best = (b, r["decode_tok_s"])
        if best:
            capacity[v.name]["best_batch"], capacity[v.name]["best_decode_tok_s"] = best
    cfg_json = asdict(cfg)
    cfg_json["variants"] = [asdict(v) for v in cfg.variants]
    return {"config": cfg_json, "latency": latency, "capacity": capacity, "sweep": sweep,
            "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------- report

def kv_memory_table(result: dict) -> str:
    ctxs = sorted({int(c) for lat in result["latency"].values() for c in lat})
    lines = ["Decode-step latency, ms (p50 / p99)", "",
             "| config | " + " | ".join(f"ctx {c}" for c in ctxs) + " |", "|---|" + "---|" * len(ctxs)]
    for name, lat in result["latency"].items():
        cells = [f"{lat[str(c)]['p50_ms']:.1f} / {lat[str(c)]['p99_ms']:.1f}" if str(c) in lat else "–" for c in ctxs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cfg = result["config"]
    lines += ["", f"Fixed KV budget {cfg['kv_memory_gb']} GiB, requests of {cfg['prompt_len']} + "
              f"{cfg['new_tokens']} tokens", "",
              "| config | bytes/token | tokens held | max batch | best batch | decode tok/s at best |",
              "|---|---|---|---|---|---|"]
    for name, c in result["capacity"].items():
        tok_s = c.get("best_decode_tok_s")
        lines.append(f"| {name} | {c['token_bytes']:.0f} | {c['tokens']} | {c.get('max_batch', 0)} | "
                     f"{c.get('best_batch', '–')} | {'–' if tok_s is None else f'{tok_s:.1f}'} |")
    return "\n".join(lines)


def plot_kv_memory(result: dict, path: Any) -> None:
    from bastion.bench.plots import _new_figure

    fig = _new_figure(13, 4.5)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    for i, (name, lat) in enumerate(result["latency"].items()):
        cs = sorted(lat, key=int)
        ax1.plot([int(c) for c in cs], [lat[c]["p50_ms"] for c in cs], marker="o", color=f"C{i}", label=name)
        ax1.plot([int(c) for c in cs], [lat[c]["p99_ms"] for c in cs], ls="--", color=f"C{i}")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("context tokens")
    ax1.set_ylabel("decode step ms (solid p50, dashed p99)")
    ax1.legend(fontsize=8)
    names = list(result["capacity"])
    ax2.bar(names, [result["capacity"][n]["tokens"] for n in names], color=[f"C{i}" for i in range(len(names))])
    ax2.set_title(f"tokens held in {result['config']['kv_memory_gb']} GiB", fontsize=10)
    ax2.tick_params(axis="x", rotation=30, labelsize=8)
    for i, (name, sw) in enumerate(result["sweep"].items()):
        bs = sorted(sw, key=int)
        ax3.plot([int(b) for b in bs], [sw[b]["decode_tok_s"] or 0 for b in bs], marker="o", color=f"C{i}",
                 label=name)
    ax3.set_xscale("log", base=2)
    ax3.set_xlabel("batch (concurrent requests)")
    ax3.set_ylabel("aggregate decode tok/s")
    fig.suptitle("bastion bench kv-memory")
    fig.tight_layout()
    fig.savefig(path)
