"""Fault injection for the robustness benchmarks (`bastion bench soak`) and their tests.

A poisoned request is an ordinary, valid request whose sampling seed is `POISON_SEED`;
the engine's sampler is wrapped so that it raises for such a request once it has
`after_tokens` output tokens (as a sampler bug on some parameter combination would).
Nothing in the product reads POISON_SEED: faults exist only in a server started through
`python -m bastion.bench.faulty_server serve ...` (same arguments as `bastion serve`), or
where a test wraps an engine with `poison_sampler`.
"""

from __future__ import annotations

from typing import Any

POISON_SEED = 424242
AFTER_TOKENS = 2  # a stream has started (two chunks out) when the failure comes


class PoisonedSampler:
    def __init__(self, inner: Any, after_tokens: int = AFTER_TOKENS) -> None:
        self.inner, self.after_tokens = inner, after_tokens

    def __call__(self, logits, reqs, track_logits=None):
        if any(r.params.seed == POISON_SEED and r.num_output_tokens >= self.after_tokens for r in reqs):
            raise IndexError("injected fault: a sampler bug on this request's parameters")
        return self.inner(logits, reqs, track_logits)


def poison_sampler(engine: Any, after_tokens: int = AFTER_TOKENS) -> None:
    """Wrap an LLMEngine's sampler (undo with `engine.sampler = engine.sampler.inner`)."""
    engine.sampler = PoisonedSampler(engine.sampler, after_tokens)
