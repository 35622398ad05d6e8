"""`bastion bench offline`: prefill and decode tokens/s of Bastion's engine vs HF `generate`,
same weights (the GGUF, dequantized by each side), same token ids, same process and run.

Method: prefill time is a whole max_tokens=1 call; decode time per step is
(t(N) - t(1)) / (N - 1), so prefill, scheduling start-up and the first sample cancel out.
Greedy, EOS suppressed (every engine does exactly N steps), prefix caching off (a
repeated prompt must not be served from cache). Engines are interleaved within each
run, and the order rotates between runs, so load on this shared machine hits all of
them alike; we report medians.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from bastion.bench.workload import DEFAULT_TEXT_DIR, Tokenizer, load_corpus_text

ENGINE_NAMES = ("bastion", "hf-fp32", "hf-bf16")
_METRICS = ("prefill_tok_s", "prefill_b8_tok_s", "decode_b1_tok_s", "decode_b8_tok_s")


@dataclass(frozen=True)
class OfflineConfig:
    prompt_len: int = 256
    new_tokens: int = 128
    batch: int = 8  # the "batch-8" size; batch 1 is always measured
    runs: int = 3
    threads: int = 2
    text_dir: str = DEFAULT_TEXT_DIR
    time_limit_s: float = 3600.0  # runs not started by then are skipped (result marked partial)

    def __post_init__(self) -> None:
        if self.prompt_len < 1:
            raise ValueError("prompt_len must be >= 1")
        if self.new_tokens < 2:
            raise ValueError("new_tokens must be >= 2 (decode time is t(N) - t(1))")
        for name in ("batch", "runs", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.time_limit_s > 0:
            raise ValueError("time_limit_s must be > 0")


class OfflineEngine(Protocol):
    """Anything that greedily generates exactly `max_tokens` ids per prompt."""

    name: str

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]: ...


class HFEngine:
    """transformers `generate`, greedy; min_new_tokens == max_new_tokens masks EOS."""

    def __init__(self, name: str, model: Any) -> None:
        self.name = name
        self.model = model

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        import torch

        # Equal-length prompts: no padding, so both sides do the same arithmetic.
        ids = torch.tensor(prompts, dtype=torch.long)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                pad_token_id=self.model.config.eos_token_id, top_p=None, top_k=None, temperature=None,
            )
        return out[:, ids.shape[1]:].tolist()


class BastionEngine:
    """Bastion's offline `LLM`; prefix caching off so repeats really prefill."""

    def __init__(self, model_path: str | None, dtype: str = "bfloat16", threads: int = 2,
                 name: str = "bastion") -> None:
        from bastion.config import CacheConfig, Config, ModelConfig
        from bastion.serving.llm import LLM

        self.name = name
        self.llm = LLM(Config(model=ModelConfig(path=model_path, dtype=dtype, device="cpu", threads=threads),
                              cache=CacheConfig(prefix_caching=False)))

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        from bastion.engine.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return [list(c.token_ids) for c in self.llm.generate(prompts, params)]


def load_hf_engines(gguf: str | Path, dtypes: Sequence[str] = ("float32", "bfloat16")) -> list[HFEngine]:
    """HF models from the same GGUF Bastion loads (dequantized to fp32 by transformers);
    the bf16 engine is a cast copy, so both see identical weights before rounding."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf = Path(gguf)
    base = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                dtype=torch.float32).eval()
    engines = []
    for dt in dtypes:
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dt]
        model = base if torch_dtype == torch.float32 else copy.deepcopy(base).to(torch_dtype)
        engines.append(HFEngine(f"hf-{dt.replace('float', 'fp').replace('bfp', 'bf')}", model))
    return engines


def make_prompts(tokenizer: Tokenizer, cfg: OfflineConfig) -> list[list[int]]:
    """`cfg.batch` disjoint windows of real text, each exactly prompt_len tokens; prompt 0
    is the batch-1 prompt. Distinct prompts keep a batch from sharing work."""
    ids = tokenizer.encode(load_corpus_text(cfg.text_dir), add_special_tokens=False)
    need = cfg.batch * cfg.prompt_len
    if len(ids) < need:
        raise ValueError(f"corpus has {len(ids)} tokens, need {need}")
    return [list(ids[i * cfg.prompt_len:(i + 1) * cfg.prompt_len]) for i in range(cfg.batch)]


def _timed(engine: OfflineEngine, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    out = engine.generate(prompts, n)
    dt = time.perf_counter() - t0
    if len(out) != len(prompts) or any(len(o) != n for o in out):
        raise RuntimeError(f"{engine.name}: asked for {n} tokens x {len(prompts)} prompts, "
                           f"got lengths {[len(o) for o in out]}")
    return dt, out


def measure_once(engine: OfflineEngine, prompts: list[list[int]], cfg: OfflineConfig
                 ) -> tuple[dict[str, float | None], list[int]]:
    """One run of one engine: prefill and decode at batch 1 and batch `cfg.batch`.
    Also returns the batch-1 greedy output (for the agreement check)."""
    row: dict[str, float | None] = {}
    first_out: list[int] = []
    for label, batch in (("b1", prompts[:1]), ("b8", prompts)):
        t1, _ = _timed(engine, batch, 1)
        tn, out = _timed(engine, batch, cfg.new_tokens)
        if label == "b1":
            first_out = out[0]
        step = (tn - t1) / (cfg.new_tokens - 1)
        row["prefill_tok_s" if label == "b1" else "prefill_b8_tok_s"] = len(batch) * cfg.prompt_len / t1
        # A non-positive difference means t(1) was noisier than the whole decode: no number.
        row[f"decode_{label}_tok_s"] = len(batch) / step if step > 0 else None
    return row, first_out


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Leading tokens two greedy outputs share: a cheap check that engines agree."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run_offline(engines: Sequence[OfflineEngine], prompts: list[list[int]], cfg: OfflineConfig,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Warm up every engine, then `cfg.runs` interleaved runs. The first engine is the
    reference for ratios and token agreement."""
    if not engines:
        raise ValueError("no engines")
    if len(prompts) != cfg.batch or any(len(p) != cfg.prompt_len for p in prompts):
        raise ValueError(f"need {cfg.batch} prompts of {cfg.prompt_len} tokens")
    deadline = time.monotonic() + cfg.time_limit_s
    for e in engines:  # first calls allocate caches / pick kernels: keep them out of the numbers
        _timed(e, prompts, 2)
        _timed(e, prompts[:1], 2)
    raw: dict[str, list[dict[str, float | None]]] = {e.name: [] for e in engines}
    outputs: dict[str, list[int]] = {}
    partial = False
    for run in range(cfg.runs):
        k = run % len(engines)
        for e in list(engines[k:]) + list(engines[:k]):
            if time.monotonic() > deadline:
                partial = True
                log(f"time limit reached; skipping {e.name} run {run + 1}")
                continue
            row, out = measure_once(e, prompts, cfg)
            raw[e.name].append(row)
            outputs.setdefault(e.name, out)
            log(f"[{e.name} run {run + 1}] " + ", ".join(
                f"{m} {row[m]:.1f}" if row[m] is not None else f"{m} -" for m in _METRICS))
    medians = {name: _medians(rows) for name, rows in raw.items()}
    ref = engines[0].name
    return {
        "config": asdict(cfg),
        "prompt_len": cfg.prompt_len,
        "new_tokens": cfg.new_tokens,
        "threads": cfg.threads,
        "runs": cfg.runs,
        "partial": partial,
        "reference": ref,
        "engines": [e.name for e in engines],
        "raw": raw,
        "medians": medians,
        "ratios": {name: {m: medians[ref][m] / v for m, v in med.items()
                          if v and medians[ref].get(m)}
                   for name, med in medians.items() if name != ref},
        "agreement_with_reference": {name: shared_prefix(outputs.get(ref, []), out)
                                     for name, out in outputs.items() if name != ref},
        "versions": _versions(),
    }


def _medians(rows: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for m in _METRICS:
        vals = [r[m] for r in rows if r.get(m) is not None]
        out[m] = statistics.median(vals) if vals else None
    return out


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "bastion"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
