"""Record-level DP accounting for one owner (Poisson-subsampled Gaussian mechanism).

Each owner runs DP-SGD on its own n records: every step samples each record independently
with rate q = batch_size / n, clips each record's gradient (LoRA parameters only) to L2
norm C and adds N(0, (sigma C)^2) noise to the sum. Over the whole federation an owner
takes T = rounds * local_steps such steps; the aggregator and the other owners only ever
see post-processed outputs, so the owner's (epsilon, delta) with delta = 1/n bounds what
anyone downstream (server, other owners, users of the adapter) can learn about any single
record of that owner. Records are 64-token chunks, so a secret repeated in k records is
protected at group level k * epsilon, not epsilon.

sigma is calibrated with Opacus' PRV accountant (numerical privacy-loss-random-variable
composition, tight); the reported epsilon is PRV, with Google dp-accounting's RDP bound
(looser, always >= PRV up to its numerical error) as an independent cross-check.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PrivacyPlan:
    """What an owner commits to before training: sigma for the whole federation."""

    target_epsilon: float  # math.inf: no DP (sigma = 0, no clipping)
    delta: float  # 1 / n
    sample_rate: float  # q = batch_size / n
    total_steps: int  # T = rounds * local_steps
    noise_multiplier: float  # sigma

    def __post_init__(self) -> None:
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {self.sample_rate}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")


@functools.lru_cache(maxsize=16)  # pure; every round re-plans the same owner
def plan(target_epsilon: float, n_records: int, batch_size: int, total_steps: int) -> PrivacyPlan:
    """Calibrate sigma so that T steps at rate q spend exactly `target_epsilon` (PRV)."""
    q = min(1.0, batch_size / n_records)
    delta = 1.0 / n_records
    if math.isinf(target_epsilon):
        return PrivacyPlan(target_epsilon, delta, q, total_steps, 0.0)
    from opacus.accountants.utils import get_noise_multiplier

    sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=q,
                                 steps=total_steps, accountant="prv", epsilon_tolerance=0.01)
    return PrivacyPlan(target_epsilon, delta, q, total_steps, float(sigma))


def epsilon_prv(sigma: float, q: float, steps: int, delta: float) -> float:
    if sigma <= 0:
        return math.inf
    if steps == 0:
        return 0.0
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(sigma, q, steps)]
    return float(acc.get_epsilon(delta=delta))


def epsilon_rdp(sigma: float, q: float, steps: int, delta: float) -> float:
    """Cross-check with dp-accounting's RDP accountant (independent implementation)."""
    if sigma <= 0:
        return math.inf
    if steps == 0:
        return 0.0
    import logging

    import dp_accounting

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    acc = dp_accounting.rdp.RdpAccountant()
    logging.disable(logging.WARNING)  # it warns per excluded low order; the bound stays valid
    try:
        acc.compose(event)
        return float(acc.get_epsilon(delta))
    finally:
        logging.disable(logging.NOTSET)


def protection_statement(target_epsilon: float, client_dp_noise: float, seq_len: int) -> dict[str, str]:
    """Plain-language scope of the guarantees, written into the training report."""
    record = ("none: epsilon = inf, no DP-SGD; the adapter may memorise training records"
              if math.isinf(target_epsilon) else
              "record-level (epsilon, delta=1/n) DP per data owner: changing any one training "
              f"record (a {seq_len}-token chunk) of an owner changes the distribution of everything the "
              "server sees and of the final adapter by at most e^epsilon (plus delta). Text that "
              "repeats in k records is protected at k*epsilon. Protects records, not whole owners.")
    client = ("none: an owner's participation and aggregate statistics are not hidden"
              if client_dp_noise <= 0 else
              f"client-level DP noise (Flower server-side fixed clipping, noise multiplier "
              f"{client_dp_noise}) on each owner's whole update; its epsilon depends on the number "
              "of owners sampled and is not accounted here. Assumes an honest server.")
    return {"records": record, "clients": client}
