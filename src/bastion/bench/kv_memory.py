"""`bastion bench kv-memory`: what a quantized KV cache does to speed and capacity.

(a) Decode-step latency vs context length: one request, its prompt (real licence text)
    prefilled, then `steps` (>= 64) timed engine steps of one decode each; p50 and p99
    per config and context over the steps of `repeats` runs, configs interleaved. A KIVI
    cache quantizes a G-token group every G steps, so a flush spike would show in p99.
(b) Fixed KV byte budget (`kv_memory_gb`): the tokens the block manager can hold
    (blocks x block size; KIVI's per-sequence fp windows are charged to the same budget
    for max_num_seqs = batch), the largest batch of prompt_len + new_tokens requests
    that fits without preemption, and aggregate decode tokens/s over a batch-size sweep
    (all requests submitted at once, greedy, EOS ignored; decode rate = batch / median
    time of a step in which all of them decode, see `batch_decode_rate`). Per batch size
    the configs are measured in turn, `repeats` times, order reversed every other round,
    and the median reported: a difference of two multi-second runs is noisy on a shared machine, and
    measuring one config's whole sweep before the next let load drift bias the ratio.

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
    repeats: int = 3

    def __post_init__(self) -> None:
        for name in ("steps", "prompt_len", "new_tokens", "threads", "repeats"):
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


def _run_batch(engine: Any, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[float]]:
    """Wall time of the whole batch, and the times of its steady steps: those where every
    request of the batch is decoding (all prompts computed, none finished)."""
    from bastion.engine.sampling_params import SamplingParams

    p = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(f"b{time.monotonic_ns()}-{i}", ids, p)
    steady: list[float] = []
    t = time.perf_counter()
    while engine.has_unfinished():
        reqs = list(engine.requests.values())
        pure = len(reqs) == len(prompts) and all(r.num_computed_tokens >= r.num_prompt_tokens for r in reqs)
        t0 = time.perf_counter()
        engine.step()
        if pure:
            steady.append(time.perf_counter() - t0)
    return time.perf_counter() - t, steady


MIN_STEADY_STEPS = 8


def batch_decode_rate(engine: Any, prompts: list[list[int]], new_tokens: int) -> dict:
    """All prompts submitted at once, run to the end twice: with 1 and with new_tokens
    output tokens each. Decode tok/s = batch / median time of a steady step (all `batch`
    requests decoding, no prefill chunk in the step), when the run has >= MIN_STEADY_STEPS
    of them (new_tokens must outlast the other prompts' chunked prefill); else the
    two-run difference batch * (new_tokens - 1) / (t_n - t_1), which is noisy when prefill
    dominates (measured: 26-290 tok/s over three runs of one config at batch 16)."""
    b = len(prompts)
    before = engine.scheduler.num_preemptions
    t1, _ = _run_batch(engine, prompts, 1)
    tn, steady = _run_batch(engine, prompts, new_tokens)
    dec = b * (new_tokens - 1)
    diff = dec / (tn - t1) if tn > t1 else None
    rate = b / statistics.median(steady) if len(steady) >= MIN_STEADY_STEPS else diff
    return {"decode_tok_s": rate, "estimator": "steady" if len(steady) >= MIN_STEADY_STEPS else "difference",
            "steady_steps": len(steady), "steady_step_ms_p50": statistics.median(steady) * 1e3 if steady else None,
            "decode_tok_s_difference": diff, "decode_tokens": dec, "total_tok_s": b * new_tokens / tn,
            "t_first_token_s": t1, "t_total_s": tn, "preemptions": engine.scheduler.num_preemptions - before}


def run_kv_memory(cfg: KVMemoryConfig, maker: EngineMaker | None = None, log: Callable[[str], None] = print) -> dict:
    """`maker` must build engines of cfg.dtype and cfg.max_model_len (default: one is made here)."""
    maker = maker or EngineMaker(cfg.model, cfg.dtype, cfg.max_model_len, cfg.threads)
    latency: dict[str, dict[str, dict]] = {v.name: {} for v in cfg.variants}
    maker.make(single_sequence_cache(cfg.variants[0], cfg.max_model_len), max_num_seqs=1)  # loads the tokenizer
    corpus = maker.tokenizer.encode(corpus_text(cfg.text_dir), add_special_tokens=False)
    for ctx in cfg.contexts:
        # (a) one sequence of ctx tokens; configs interleaved, step times pooled over repeats
        c = min(ctx, cfg.max_model_len - cfg.steps - 1)
        steps: dict[str, list[float]] = {v.name: [] for v in cfg.variants}
        for rep in range(cfg.repeats):
            for v in (cfg.variants if rep % 2 == 0 else cfg.variants[::-1]):
                engine = maker.make(single_sequence_cache(v, cfg.max_model_len), max_num_seqs=1)
                steps[v.name] += [t * 1e3 for t in decode_latency(engine, corpus[:c], cfg.steps)]
        for v in cfg.variants:
            ts = steps[v.name]
            latency[v.name][str(c)] = {"p50_ms": statistics.median(ts), "p99_ms": _percentile(ts, 99),
                                       "max_ms": max(ts), "mean_ms": statistics.fmean(ts), "steps": len(ts)}
            log(f"[{v.name} latency ctx={c}] p50 {latency[v.name][str(c)]['p50_ms']:.1f} ms, "
                f"p99 {latency[v.name][str(c)]['p99_ms']:.1f} ms, max {max(ts):.1f} ms ({len(ts)} steps)")
    capacity, sweep = _budget_sweep(cfg, maker, corpus, log)
    cfg_json = asdict(cfg)
    cfg_json["variants"] = [asdict(v) for v in cfg.variants]
    return {"config": cfg_json, "latency": latency, "capacity": capacity, "sweep": sweep,
            "torch_threads": torch.get_num_threads()}


def _budget_sweep(cfg: KVMemoryConfig, maker: EngineMaker, corpus: list[int], log: Callable[[str], None]):
    """(b): per batch size, every config that still fits it, interleaved, `repeats` times.
    Returns (capacity, sweep) keyed by config name."""
    capacity: dict[str, dict] = {}
    sweep: dict[str, dict[str, dict]] = {v.name: {} for v in cfg.variants}
    live = list(cfg.variants)  # a config leaves once a batch no longer fits its budget
    per_req = cfg.prompt_len + cfg.new_tokens

    def engine_for(v: KVVariant, b: int):
        try:
            return maker.make(v.cache_config(kv_memory_gb=cfg.kv_memory_gb), max_num_seqs=b)
        except ValueError as exc:  # the budget cannot even hold b fp windows
            log(f"[{v.name} batch={b}] skipped: {exc}")
            return None

    for b in cfg.batches:
        fitting = []
        for v in live:
            engine = engine_for(v, b)
            if engine is None:
                continue
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
                continue
            cap["max_batch"] = b
            fitting.append(v)
        live = fitting
        if not live:
            break
        prompts = [corpus[i * 97 : i * 97 + cfg.prompt_len] for i in range(b)]
        runs: dict[str, list[dict]] = {v.name: [] for v in live}
        for rep in range(cfg.repeats):
            for v in (live if rep % 2 == 0 else live[::-1]):
                runs[v.name].append(batch_decode_rate(engine_for(v, b), prompts, cfg.new_tokens))
        for v in live:
            rates = [r["decode_tok_s"] for r in runs[v.name] if r["decode_tok_s"]]
            sweep[v.name][str(b)] = {"decode_tok_s": statistics.median(rates) if rates else None,
                                     "decode_tok_s_runs": [r["decode_tok_s"] for r in runs[v.name]],
                                     "preemptions": sum(r["preemptions"] for r in runs[v.name]), "runs": runs[v.name]}
            r = sweep[v.name][str(b)]
            log(f"[{v.name} batch={b}] {r['decode_tok_s'] or 0:.1f} decode tok/s (median of {cfg.repeats}), "
                f"{capacity[v.name]['tokens_by_batch'][str(b)]} tokens in budget, {r['preemptions']} preemptions")
    for name, sw in sweep.items():
        rated = [(int(b), r["decode_tok_s"]) for b, r in sw.items() if r["decode_tok_s"]]
        if rated:
            capacity[name]["best_batch"], capacity[name]["best_decode_tok_s"] = max(rated, key=lambda x: x[1])
    return capacity, sweep


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
              "| config | bytes/token | tokens held | max batch | best batch | decode tok/s at best "
              "| first token, s (batch 1) |",
              "|---|---|---|---|---|---|---|"]
    for name, c in result["capacity"].items():
        tok_s = c.get("best_decode_tok_s")
        runs = result["sweep"].get(name, {}).get("1", {}).get("runs") or []
        ttft = statistics.median(r["t_first_token_s"] for r in runs) if runs else None  # one prompt's prefill
        lines.append(f"| {name} | {c['token_bytes']:.0f} | {c['tokens']} | {c.get('max_batch', 0)} | "
                     f"{c.get('best_batch', '–')} | {'–' if tok_s is None else f'{tok_s:.1f}'} | "
                     f"{'–' if ttft is None else f'{ttft:.2f}'} |")
    return "\n".join(lines)


def plot_kv_memory(result: dict, path: Any) -> None:
    from bastion.bench.plots import new_figure

    fig = new_figure(13, 4.5)
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
