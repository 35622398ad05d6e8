"""Per-request sampling parameters (vLLM's names and meanings)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Temperatures below this are greedy (as in vLLM): dividing logits by 1e-40 overflows
# to inf and the softmax to NaN.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or anything below GREEDY_BELOW_TEMPERATURE) = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = off
    seed: int | None = None  # per-request generator: same seed, same output
    stop: tuple[str, ...] = ()  # stop strings (checked on detokenized text)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # keep going past EOS (benchmarks need fixed lengths)
    min_tokens: int = 0  # EOS and stop token ids are masked until this many tokens
    logprobs: int | None = None  # None: off; n >= 0: sampled token's logprob + top-n
    prompt_logprobs: int | None = None  # same, for every prompt token (echo/perplexity)
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature < float("inf"):  # also catches NaN
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.temperature < GREEDY_BELOW_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 0, got {self.top_k}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 20:
                raise ValueError(f"{name} must be in [0, 20], got {v}")
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class TokenLogprob:
    """Logprob of one chosen token plus the top-n alternatives at that position."""

    token_id: int
    logprob: float
    rank: int  # 1 = most likely
    top: list[tuple[int, float]] = field(default_factory=list)
