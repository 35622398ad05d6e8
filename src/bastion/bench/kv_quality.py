"""`bastion bench kv-quality`: what a quantized KV cache costs in quality, and saves in bytes.

For every cache config (fp16 reference, int8, kivi4, kivi2, k4v2, k2v4, the `kivi`
default and variants) at each context length (2k, 4k, 8k):

* teacher forcing: the context (deterministic real text: the GPL-3 licence, then the
  other licences of /usr/share/common-licenses, sorted) is prefilled in chunks, then
  `steps` (128) one-token decode steps are fed the true next token. PPL is over those
  targets; top-1 agreement is the fraction of steps where argmax(logits) equals the
  reference's; we also report mean KL(ref || config). The model runs in float32 so
  only the cache's error is measured. "8k" is capped at max_model_len - steps (8064
  on SmolLM2-135M, whose RoPE table stops at 8192).
* KV bytes per token of one ctx-token sequence: quantized groups (codes + fp16 scales
  and minimums) + the fp16 window (R..R+G-1 newest tokens) + the fp16 sink copy, vs 2
  bytes per element for fp16.
* passkey retrieval at 4k/8k: a 5-digit key stated at several depths of filler real
  text, greedy answer, success rate.

Peers (same run, `--hf-python`): HF transformers `QuantizedCache` (quanto backend, int4
and int2, residual 128, group 64; HQQ if quanto is absent) on the HF export of the same
model, through kv_quality_hf.py run by that venv's python. Install:

    python -m venv /work/peers/hfquant
    /work/peers/hfquant/bin/pip install torch==2.13.0 transformers optimum-quanto
    (if optimum-quanto is unavailable: /work/peers/hfquant/bin/pip install hqq)
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from bastion.bench.quality_metrics import passkey_found, quality_metrics

TEXT_DIR = "/usr/share/common-licenses"
FIRST_TEXT = "GPL-3"
PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about it.\n\n")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


# ---------------------------------------------------------------- configs

@dataclass(frozen=True)
class KVVariant:
    """One cache config: a CacheConfig kind plus optional KIVI overrides (None = preset)."""

    name: str
    kind: str
    group_size: int | None = None
    residual: int | None = None
    sink: int | None = None
    hadamard: bool | None = None
    clip: bool | None = None  # least-squares group ranges instead of min-max
    value_group: int | None = None  # channels per value range (None: G)
    kernel: str = "auto"  # decode attention: native kernel (auto/native) or torch ops

    def cache_config(self, num_blocks: int | None = None, kv_memory_gb: float = 1.0) -> Any:
        from bastion.config import CacheConfig

        return CacheConfig(kind=self.kind, num_blocks=num_blocks, kv_memory_gb=kv_memory_gb, prefix_caching=False,
                           kv_group_size=self.group_size, kv_residual=self.residual, kv_sink=self.sink,
                           kv_hadamard=self.hadamard, kv_clip=self.clip, kv_value_group=self.value_group,
                           kv_kernel=self.kernel)

    def quant_options(self) -> dict | None:
        cc = self.cache_config(num_blocks=1)
        return cc.quant_options() if cc.quantized else None

    def bits(self) -> tuple[int, int] | None:
        return self.cache_config(num_blocks=1).kv_bits


REFERENCE = KVVariant("fp32", "fp32")  # model dtype float32: the quality reference
DEFAULT_VARIANTS = (
    KVVariant("fp16", "fp16"),
    KVVariant("int8", "int8"),
    KVVariant("kivi4", "kivi4"),
    KVVariant("kivi2", "kivi2"),
    KVVariant("k4v2", "k4v2"),
    KVVariant("k2v4", "k2v4"),
    KVVariant("kivi", "kivi"),
    # the config search's front: best >= 4x at 8k (+ clipped ranges), >= 4x at 2k, the preset's
    # settings spelled out (skipped when equal to `kivi`), best 2-bit
    KVVariant("k4v2-G64-R128-S64-had", "k4v2", group_size=64, residual=128, sink=64, hadamard=True),
    KVVariant("k4v2-G64-R128-S64-had-clip", "k4v2", group_size=64, residual=128, sink=64, hadamard=True, clip=True),
    KVVariant("k4v2-G64-R64-had", "k4v2", group_size=64, residual=64, sink=0, hadamard=True),
    KVVariant("k4v2-G32-R64-S32-had", "k4v2", group_size=32, residual=64, sink=32, hadamard=True),
    KVVariant("kivi2-R32-S32-had", "kivi2", group_size=32, residual=32, sink=32, hadamard=True),
)


def parse_variant(text: str) -> KVVariant:
    """`name=kind[:gG][:vgN][:rR][:sS][:had][:clip][:torch|:native]`, or just a kind: e.g.
    `k4v2`, `x=kivi2:g64:r64:s64:had` (vgN: N channels per value range instead of G;
    torch/native: the decode-attention kernel, default auto)."""
    name, sep, spec = text.partition("=")
    if not sep:
        name, spec = text, text
    kind, *opts = spec.split(":")
    kw: dict[str, Any] = {}
    keys = {"g": "group_size", "vg": "value_group", "r": "residual", "s": "sink"}
    for o in opts:
        if o in ("had", "hadamard"):
            kw["hadamard"] = True
        elif o == "nohad":
            kw["hadamard"] = False
        elif o in ("clip", "noclip"):
            kw["clip"] = o == "clip"
        elif o in ("torch", "native"):
            kw["kernel"] = o
        elif (m := re.fullmatch(r"(vg|[grs])(\d+)", o)):
            kw[keys[m[1]]] = int(m[2])
        else:
            raise ValueError(f"bad variant option {o!r} in {text!r} (want gN, vgN, rN, sN, had, nohad, clip, noclip, "
                             "torch, native)")
    v = KVVariant(name, kind, **kw)
    v.cache_config(num_blocks=1)  # validates
    return v


# ---------------------------------------------------------------- bytes accounting

def kv_bytes_per_token(variant: KVVariant, num_layers: int, num_kv_heads: int, head_dim: int,
                       ctx_len: int) -> float:
    """Average KV bytes per token of one ctx_len-token sequence (all layers): fp kinds at
    their element size; quantized kinds: groups incl. fp16 scales/mins + fp16 window +
    fp16 copy of the first S (sink) tokens once they are quantized."""
    from bastion.engine.kv_cache.factory import quant_spec
    from bastion.engine.kv_cache.quant import bytes_per_token_at, split_context

    fp16_tok = 2 * num_layers * num_kv_heads * head_dim * 2
    if variant.bits() is None:
        return fp16_tok * (2 if variant.kind in ("fp32", "float32") else 1)
    o = variant.quant_options()
    spec = quant_spec(variant.cache_config(num_blocks=1))
    n_q, _ = split_context(spec, ctx_len)
    base = bytes_per_token_at(spec, num_layers, num_kv_heads, head_dim, ctx_len)
    return base + min(o["sink"], n_q) * fp16_tok / ctx_len


# ---------------------------------------------------------------- text

def corpus_text(text_dir: str | Path = TEXT_DIR) -> str:
    """GPL-3 first (the 2k/4k contexts lie inside it), then every other licence text
    once, sorted by file name (links resolved): deterministic and > 50k tokens."""
    root = Path(text_dir)
    first = (root / FIRST_TEXT).resolve()
    parts, seen = [], set()
    for p in [first] + sorted(root.iterdir()):
        r = p.resolve()
        if r in seen or not r.is_file():
            continue
        seen.add(r)
        parts.append(r.read_text(encoding="utf-8", errors="replace"))
    return "\n\n".join(parts)


def passkey_prompts(tokenizer: Any, filler_ids: list[int], ctx: int, depths: tuple[float, ...],
                    seed: int = 0) -> list[tuple[list[int], str, float]]:
    """(prompt ids of exactly ~ctx tokens, key, depth) per depth: intro + filler with the
    needle inserted at `depth` of the filler + question. Keys: 5 digits, from `seed`."""
    import random

    rng = random.Random(seed)
    intro = tokenizer.encode(PASSKEY_INTRO, add_special_tokens=False)
    question = tokenizer.encode(PASSKEY_QUESTION, add_special_tokens=False)
    out = []
    for d in depths:
        key = str(rng.randint(10000, 99999))
        needle = tokenizer.encode(PASSKEY_NEEDLE.format(key=key), add_special_tokens=False)
        n_fill = ctx - len(intro) - len(needle) - len(question)
        if n_fill <= 0 or n_fill > len(filler_ids):
            raise ValueError(f"passkey context {ctx} does not fit the filler/needle")
        at = int(round(d * n_fill))
        ids = intro + filler_ids[:at] + needle + filler_ids[at:n_fill] + question
        out.append((ids, key, d))
    return out


# ---------------------------------------------------------------- engine drivers

def teacher_forced_logits(engine: Any, ids: list[int], ctx: int, steps: int, chunk: int = 512,
                          req_id: str = "kvq") -> torch.Tensor:
    """Prefill ids[:ctx] in `chunk`-token steps, then `steps` one-token decode steps fed
    ids[ctx], ids[ctx+1], ...; returns the decode steps' logits [steps, V] (row i
    predicts ids[ctx + i + 1]). The request's blocks are freed at the end."""
    from bastion.engine.request import Request
    from bastion.engine.sampling_params import SamplingParams
    from bastion.engine.scheduler import ScheduledBatch

    if len(ids) < ctx + steps + 1:
        raise ValueError(f"need {ctx + steps + 1} tokens, have {len(ids)}")
    req = Request(req_id, list(ids[:ctx]), SamplingParams(max_tokens=steps + 1, temperature=0.0))
    bm, runner = engine.block_manager, engine.runner
    if not bm.allocate(req, ctx + steps):
        raise RuntimeError(f"KV pool too small for {ctx + steps} tokens")
    rows = []
    try:
        while req.num_computed_tokens < ctx:
            n = min(chunk, ctx - req.num_computed_tokens)
            runner.execute(ScheduledBatch([(req, n)]))
            req.num_computed_tokens += n
        for i in range(steps):
            req.token_ids.append(ids[ctx + i])
            rows.append(runner.execute(ScheduledBatch([(req, 1)])).sample_logits[0])
            req.num_computed_tokens += 1
    finally:
        bm.free_request(req)
    return torch.stack(rows)


def greedy_answer(engine: Any, prompt: list[int], max_new: int, req_id: str = "pk") -> list[int]:
    from bastion.engine.sampling_params import SamplingParams

    engine.add_request(req_id, prompt, SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True))
    out: list[int] = []
    while engine.has_unfinished():
        for o in engine.step():
            out += o.new_token_ids
    return out


# ---------------------------------------------------------------- the benchmark

@dataclass(frozen=True)
class KVQualityConfig:
    contexts: tuple[int, ...] = (2048, 4096, 8192)
    steps: int = 128
    chunk: int = 512
    passkey_contexts: tuple[int, ...] = (4096, 8192)
    passkey_depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    passkey_new_tokens: int = 8
    max_model_len: int = 8192
    threads: int = 2
    text_dir: str = TEXT_DIR
    model: str | None = None  # GGUF / HF dir; None = embedded SmolLM2
    variants: tuple[KVVariant, ...] = field(default=DEFAULT_VARIANTS)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.chunk < 1 or self.threads < 1:
            raise ValueError("steps, chunk and threads must be >= 1")
        if not self.contexts and not self.passkey_contexts:
            raise ValueError("nothing to measure: no contexts and no passkey contexts")


def effective_ctx(ctx: int, cfg: KVQualityConfig) -> int:
    """Contexts are capped so that context + steps fits max_model_len."""
    return min(ctx, cfg.max_model_len - cfg.steps)


class EngineMaker:
    """Loads the checkpoint once; every later engine shares the model and gets a new KV
    pool from the engine's own factory (sized by num_blocks or the byte budget)."""

    def __init__(self, model: str | None, dtype: str, max_model_len: int, threads: int):
        from bastion.config import ModelConfig

        self.model_cfg = ModelConfig(path=model, dtype=dtype, max_model_len=max_model_len, threads=threads)
        self.base: Any = None
        self.tokenizer: Any = None

    def make(self, cache: Any, max_num_seqs: int = 1, max_num_batched_tokens: int = 512) -> Any:
        from bastion.config import Config, SchedulerConfig
        from bastion.engine.llm_engine import LLMEngine

        cfg = Config(model=self.model_cfg, cache=cache,
                     scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                               max_waiting=max(256, max_num_seqs)))
        if self.base is None:
            from bastion.serving.tokenizer import load_engine

            self.base, self.tokenizer, _ = load_engine(cfg, show_progress=False)
            return self.base
        from bastion.engine.kv_cache.factory import build_kv_cache

        b = self.base
        p = next(b.runner.model.parameters())
        b.kv_cache = b.runner.kv = None  # drop the old pool before allocating the next
        kv = build_kv_cache(cfg, b.runner.model.arch, p.dtype, p.device)
        self.base = LLMEngine(cfg, b.runner.model, kv, vocab_size=b.vocab_size, eos_token_id=b.eos_token_id,
                              max_model_len=b.max_model_len)
        return self.base


def single_sequence_cache(variant: KVVariant, max_model_len: int) -> Any:
    """The variant's CacheConfig with room for one max_model_len-token sequence."""
    opts = variant.quant_options()
    return variant.cache_config(num_blocks=-(-max_model_len // (opts["group_size"] if opts else 16)) + 1)


def run_kv_quality(cfg: KVQualityConfig, maker: EngineMaker | None = None, log: Callable[[str], None] = print,
                   hf_python: str | None = None, hf_dir: str = "") -> dict:
    """Reference first (its logits are kept), then every variant. Returns the JSON result.
    `maker` must build float32 engines of max_model_len (default: one is made here)."""
    import time

    maker = maker or EngineMaker(cfg.model, "float32", cfg.max_model_len, cfg.threads)

    def factory(v: KVVariant) -> Any:
        return maker.make(single_sequence_cache(v, cfg.max_model_len), 1, cfg.chunk)

    engine = factory(REFERENCE)
    tok = maker.tokenizer
    arch = engine.runner.model.arch
    corpus = tok.encode(corpus_text(cfg.text_dir), add_special_tokens=False)
    ctxs = [effective_ctx(c, cfg) for c in cfg.contexts]
    pk_ctxs = [effective_ctx(c, cfg) for c in cfg.passkey_contexts]
    pk_filler = corpus[len(corpus) // 2:]  # other licences: a different text from the eval contexts
    pk_prompts = {c: passkey_prompts(tok, pk_filler, c - cfg.passkey_new_tokens, cfg.passkey_depths)
                  for c in pk_ctxs}
    targets = {c: torch.tensor(corpus[c + 1 : c + 1 + cfg.steps]) for c in ctxs}
    ref_logits: dict[int, torch.Tensor] = {}
    rows: list[dict] = []
    seen: dict[tuple, str] = {}
    for variant in (REFERENCE, *cfg.variants):
        # the kernel is part of the key: native vs torch is a comparison worth asking for
        key = (variant.bits() or variant.kind, tuple(sorted((variant.quant_options() or {}).items())),
               variant.kernel if variant.bits() else None)
        if key in seen:  # e.g. the `kivi` preset equals one of the listed variants
            log(f"[{variant.name}] same cache as {seen[key]}: skipped")
            continue
        seen[key] = variant.name
        if variant is not REFERENCE:
            engine = factory(variant)
        for c in ctxs:
            t0 = time.perf_counter()
            logits = teacher_forced_logits(engine, corpus, c, cfg.steps, cfg.chunk)
            if variant is REFERENCE:
                ref_logits[c] = logits
            m = quality_metrics(logits, ref_logits[c], targets[c])
            row = {"config": variant.name, "kind": variant.kind, "options": variant.quant_options(), "ctx": c,
                   **m, "bytes_per_token": kv_bytes_per_token(variant, arch.num_layers, arch.num_kv_heads,
                                                               arch.head_dim, c)}
            row["ratio_vs_fp16"] = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * 2 / row["bytes_per_token"]
            rows.append(row)
            log(f"[{variant.name} ctx={c}] ppl {m['ppl']:.4f} (ref {m['ref_ppl']:.4f}, "
                f"{m['delta_ppl_pct']:+.2f}%), top-1 {m['top1_agreement']:.3f}, KL {m['kl']:.2e}, "
                f"{row['bytes_per_token']:.0f} B/token ({row['ratio_vs_fp16']:.2f}x), {time.perf_counter() - t0:.0f}s")
        for c, prompts in pk_prompts.items():
            hits = []
            for i, (ids, key, depth) in enumerate(prompts):
                text = tok.decode(greedy_answer(engine, ids, cfg.passkey_new_tokens, f"pk-{c}-{i}"))
                hits.append({"depth": depth, "key": key, "answer": text, "ok": passkey_found(text, key)})
            ok = sum(h["ok"] for h in hits)
            log(f"[{variant.name} passkey ctx={c}] {ok}/{len(hits)}")
            rows.append({"config": variant.name, "kind": variant.kind, "ctx": c, "passkey": hits,
                         "passkey_success": ok / len(hits)})
    peer_rows: list[dict] = []
    if hf_python:
        log(f"HF QuantizedCache peers with {hf_python} ...")
        from bastion.bench.kv_quality_hf import run_hf_peers

        peer_rows = run_hf_peers(hf_python, hf_dir, corpus, ctxs, pk_prompts, cfg, tok, arch, log)
    cfg_json = asdict(cfg)
    cfg_json["variants"] = [asdict(v) for v in cfg.variants]
    return {"config": cfg_json, "reference": REFERENCE.name, "model_layers": arch.num_layers,
            "kv_heads": arch.num_kv_heads, "head_dim": arch.head_dim, "rows": rows,
            "peer_rows": peer_rows, "torch_threads": torch.get_num_threads()}
