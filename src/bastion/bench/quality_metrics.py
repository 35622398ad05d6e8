"""Quality metrics of a serving path against a reference on the same text: perplexity,
top-1 agreement and KL of next-token distributions (teacher forced), and passkey
retrieval. Used by the KV-cache and weight benchmarks, and by their HF peer workers."""

from __future__ import annotations

import math
import re

import torch


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean NLL) of targets [N] under logits [N, V]."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    return math.exp(-lp.gather(1, targets.long().view(-1, 1)).mean().item())


def top1_agreement(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """Fraction of rows where argmax(logits) == argmax(ref_logits)."""
    return (logits.argmax(-1) == ref_logits.argmax(-1)).double().mean().item()


def mean_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """Mean over rows of KL(ref || this), nats."""
    lp, lr = torch.log_softmax(logits.double(), -1), torch.log_softmax(ref_logits.double(), -1)
    return (lr.exp() * (lr - lp)).sum(-1).mean().item()


def quality_metrics(logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor) -> dict:
    ppl, ref = perplexity(logits, targets), perplexity(ref_logits, targets)
    return {"ppl": ppl, "ref_ppl": ref, "delta_ppl_pct": 100.0 * (ppl - ref) / ref,
            "top1_agreement": top1_agreement(logits, ref_logits), "kl": mean_kl(logits, ref_logits)}


def passkey_found(text: str, key: str) -> bool:
    return re.findall(r"\d+", text)[:1] == [key]
