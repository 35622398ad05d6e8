"""The benchmarks' workload: prompts are windows of real text (the licences in
/usr/share/common-licenses), lengths drawn from a seeded distribution, so the same seed
gives byte-identical requests on any target (`bench serving`, `bench offline`, `bench lora`)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

DEFAULT_TEXT_DIR = "/usr/share/common-licenses"


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class WorkloadConfig:
    """Prompt/output lengths are uniform in [len*(1-range_ratio), len*(1+range_ratio)]
    (vLLM's "random" dataset shape), but the prompt tokens are real text, not noise:
    attention and sampling behave as in real use."""

    input_len: int = 256
    output_len: int = 128
    range_ratio: float = 0.25
    seed: int = 0
    text_dir: str = DEFAULT_TEXT_DIR

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError("input_len and output_len must be >= 1")
        if not 0 <= self.range_ratio < 1:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio}")


@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: tuple[int, ...]
    prompt_text: str
    output_len: int


def load_corpus_text(text_dir: str | Path = DEFAULT_TEXT_DIR) -> str:
    """All regular files of `text_dir`, sorted by name, each once (GPL -> GPL-3 links are
    resolved so the same text is not counted twice)."""
    root = Path(text_dir)
    seen: set[Path] = set()
    parts: list[str] = []
    for path in sorted(root.iterdir()):
        real = path.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        parts.append(real.read_text(encoding="utf-8", errors="replace"))
    if not parts:
        raise ValueError(f"no text files under {root}")
    return "\n\n".join(parts)


def make_requests(
    corpus_ids: Sequence[int], tokenizer: Tokenizer, cfg: WorkloadConfig, n: int, seed: int
) -> list[BenchRequest]:
    """`n` requests, a pure function of (corpus, cfg, n, seed)."""
    rng = random.Random(seed)
    lo_in, hi_in = _bounds(cfg.input_len, cfg.range_ratio)
    lo_out, hi_out = _bounds(cfg.output_len, cfg.range_ratio)
    if hi_in >= len(corpus_ids):
        raise ValueError(f"corpus has {len(corpus_ids)} tokens, prompts need up to {hi_in}")
    out = []
    for _ in range(n):
        plen = rng.randint(lo_in, hi_in)
        start = rng.randrange(0, len(corpus_ids) - plen)
        ids = tuple(int(t) for t in corpus_ids[start : start + plen])
        out.append(BenchRequest(ids, tokenizer.decode(list(ids)), rng.randint(lo_out, hi_out)))
    return out


def _bounds(length: int, ratio: float) -> tuple[int, int]:
    return max(1, math.floor(length * (1 - ratio))), max(1, math.ceil(length * (1 + ratio)))
