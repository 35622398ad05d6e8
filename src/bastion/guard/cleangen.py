"""CleanGen defended decoding (arXiv 2406.12257) as an engine token filter.

The adapter model drafts; the reference is the same base model without the adapter,
run by the engine as a second track of the same request in the same batch: the filter
asks for it (`tracks = (None,)`, the base model) and the engine hands its logits to the
filter with every drafted token (engine/request.py, `TokenFilter`). `CleanGenPolicy`
decides which requests are defended. A drafted token x is suspicious when
    p_adapter(x) / p_reference(x) >= alpha
(a backdoor makes its target tokens far likelier than any clean model would), and is
then replaced by the reference's own choice (greedy requests: its argmax; sampled
requests: a sample from its temperature-scaled distribution).

NOTE on k (the paper's verification window): the paper drafts k tokens, has the
reference score them in one call, replaces the first suspicious one and discards the
rest. Here the reference scores every token in the same batch as its draft, so each
token is checked the moment it is drafted: the emitted text is exactly what any k gives
(the first suspicious token is replaced and everything after it is drafted from the
replacement), with nothing drafted and thrown away and no extra latency. k exists in
the paper to amortise separate reference calls, which a batched engine does not make.

alpha is calibrated on the adapter's own clean task data: the (1 - budget) quantile of
the ratio over tokens the adapter produces on clean prompts, so about `budget` of clean
tokens would be replaced (`calibrate_alpha`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

DEFAULT_ALPHA = 20.0  # used when a policy is not calibrated; see docs/SECURITY.md


@dataclass
class CleanGen:
    """Token filter: replace a drafted token whose adapter/reference probability ratio
    reaches alpha. `log_ratios`, when a list, records log(p_a/p_r) of every drafted token
    (calibration); alpha = inf then never replaces."""

    alpha: float = DEFAULT_ALPHA
    log_ratios: list[float] | None = field(default=None, repr=False)
    tracks = (None,)  # one reference track: the base model (no adapter)

    def __post_init__(self) -> None:
        if not (self.alpha > 0):  # also NaN
            raise ValueError(f"cleangen alpha must be > 0, got {self.alpha!r}")

    def __call__(self, token: int, logits: torch.Tensor, track_logits: torch.Tensor, req) -> int:
        ref_logits = track_logits[0]  # [V]: the base model's row for the same position
        lp_a = torch.log_softmax(logits, -1)[token].item()
        lp_r = torch.log_softmax(ref_logits, -1)[token].item()
        if self.log_ratios is not None:
            self.log_ratios.append(lp_a - lp_r)
        if lp_a - lp_r < math.log(self.alpha):
            return token
        p = req.params
        if p.temperature == 0:
            return int(ref_logits.argmax())
        probs = torch.softmax(ref_logits / p.temperature, -1)
        return int(torch.multinomial(probs, 1, generator=req.generator).item())


@dataclass(frozen=True)
class CleanGenPolicy:
    """Which requests CleanGen defends: those on the adapters named at start
    (`--cleangen NAME[=ALPHA]`), unless a request's own "cleangen" field says otherwise."""

    alphas: Mapping[str, float] = field(default_factory=dict)  # adapter -> alpha, on by default

    def for_request(self, adapter: str | None, requested: bool | None) -> CleanGen | None:
        """The filter for a request on `adapter` (None: the base model); ValueError when
        the request asks for what cannot be (the base model has nothing to defend)."""
        on = (adapter in self.alphas) if requested is None else requested
        if not on:
            return None
        if adapter is None:
            raise ValueError("cleangen defends an adapter's output against the base model; this request "
                             "runs on the base model itself")
        return CleanGen(alpha=self.alphas.get(adapter, DEFAULT_ALPHA))


def calibrate_alpha(log_ratios: list[float], budget: float = 0.01, floor: float = 2.0) -> float:
    """alpha from the log-ratios of an adapter's tokens on its own clean task data: the
    (1 - budget) quantile, so ~budget of clean tokens would be replaced; never below
    `floor` (a ratio under 2 is not evidence of anything)."""
    if not log_ratios:
        raise ValueError("no tokens to calibrate on")
    if not 0 < budget < 1:
        raise ValueError(f"budget must be in (0, 1), got {budget}")
    q = torch.tensor(log_ratios, dtype=torch.float64).quantile(1 - budget).item()
    return max(math.exp(q), floor)


def parse_cleangen(spec: str) -> tuple[str, float]:
    """`--cleangen NAME` or `NAME=ALPHA` -> (adapter name, alpha)."""
    name, sep, alpha = spec.partition("=")
    if not name:
        raise ValueError(f"--cleangen expects NAME or NAME=ALPHA, got {spec!r}")
    if not sep:
        return name, DEFAULT_ALPHA
    try:
        value = float(alpha)
    except ValueError:
        raise ValueError(f"--cleangen {spec!r}: alpha must be a number") from None
    CleanGen(value)  # validates
    return name, value
