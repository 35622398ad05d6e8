"""Aggregation of client LoRA factors (pure tensor functions, no Flower, no model).

Client k holds, per module, A_k: [r_k, in], B_k: [out, r_k], scale s_k = alpha / r_k and a
weight p_k = n_k / sum(n) (sum p_k = 1). The "ideal" global update is
    dW* = sum_k p_k s_k B_k A_k                                   [out, in]
  - FedAvg of A and B (FedIT) returns s * mean_p(B) @ mean_p(A) != dW* (cross terms),
    and needs equal ranks (here: zero-padded to the max rank, as HetLoRA does).
  - FFA-LoRA freezes A (shared by all), so mean_p(B) @ A == sum p_k B_k A = dW* exactly.
  - FLoRA stacks: A_stack = [p_1 s_1 A_1; ...; p_K s_K A_K]  [sum r_k, in]
                  B_stack = [B_1, ..., B_K]                  [out, sum r_k]
    and B_stack @ A_stack == dW* exactly, for any mix of ranks.
"""

from __future__ import annotations

import torch

Factors = dict[str, torch.Tensor]  # PEFT adapter keys -> A [r, in] / B [out, r]


def modules_of(factors: Factors) -> list[str]:
    return sorted(k.removesuffix(".lora_A.weight") for k in factors if k.endswith(".lora_A.weight"))


def _ab(factors: Factors, m: str) -> tuple[torch.Tensor, torch.Tensor]:
    return factors[f"{m}.lora_A.weight"], factors[f"{m}.lora_B.weight"]


def ideal_delta(clients: list[Factors], scales: list[float], weights: list[float]) -> dict[str, torch.Tensor]:
    """dW* per module (float64 for use as an oracle)."""
    out = {}
    for m in modules_of(clients[0]):
        out[m] = sum(p * s * (b.double() @ a.double())
                     for f, s, p in zip(clients, scales, weights) for a, b in [_ab(f, m)])
    return out


def flora_stack(clients: list[Factors], scales: list[float], weights: list[float]) -> Factors:
    """Stack heterogeneous-rank factors; scale and weight are folded into A (so s = 1)."""
    out: Factors = {}
    for m in modules_of(clients[0]):
        pairs = [_ab(f, m) for f in clients]
        out[f"{m}.lora_A.weight"] = torch.cat([p * s * a for (a, _), s, p in zip(pairs, scales, weights)], dim=0)
        out[f"{m}.lora_B.weight"] = torch.cat([b for _, b in pairs], dim=1)
    return out


def concat_rounds(stacks: list[Factors]) -> Factors:
    """Sum over rounds of B_t @ A_t as one wider low-rank pair (still exact)."""
    out: Factors = {}
    for m in modules_of(stacks[0]):
        out[f"{m}.lora_A.weight"] = torch.cat([_ab(s, m)[0] for s in stacks], dim=0)
        out[f"{m}.lora_B.weight"] = torch.cat([_ab(s, m)[1] for s in stacks], dim=1)
    return out


def fedavg(clients: list[Factors], weights: list[float]) -> Factors:
    """p-weighted mean of every tensor; ranks are zero-padded to the max (rows of A,
    columns of B), which leaves each client's own product B_k A_k unchanged."""
    out: Factors = {}
    for key in clients[0]:
        ts = [f[key] for f in clients]
        r = max(t.shape[0] if ".lora_A." in key else t.shape[1] for t in ts)
        padded = []
        for t in ts:
            if ".lora_A." in key:
                padded.append(torch.nn.functional.pad(t, (0, 0, 0, r - t.shape[0])))
            else:
                padded.append(torch.nn.functional.pad(t, (0, r - t.shape[1])))
        out[key] = sum(p * t for p, t in zip(weights, padded))
    return out


def product(factors: Factors, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """scale * B @ A per module, float64."""
    return {m: scale * (b.double() @ a.double()) for m in modules_of(factors) for a, b in [_ab(factors, m)]}


def relative_error(approx: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> float:
    """||approx - exact||_F / ||exact||_F over all modules together."""
    num = sum(float((approx[m].double() - exact[m]).pow(2).sum()) for m in exact)
    den = sum(float(exact[m].pow(2).sum()) for m in exact)
    return (num / den) ** 0.5 if den > 0 else num ** 0.5


def svd_truncate(factors: Factors, rank: int) -> tuple[Factors, float]:
    """Best rank-`rank` factors of each B @ A (Eckart-Young); returns (factors, rel. error).
    Output keeps s = 1: A' = sqrt(S) Vh [rank, in], B' = U sqrt(S) [out, rank]."""
    exact = product(factors)
    out: Factors = {}
    approx = {}
    for m, dw in exact.items():
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        k = min(rank, s.numel())
        root = s[:k].sqrt()
        a, b = root[:, None] * vh[:k], u[:, :k] * root[None, :]
        if k < rank:  # keep the declared rank: pad with zero directions
            a = torch.nn.functional.pad(a, (0, 0, 0, rank - k))
            b = torch.nn.functional.pad(b, (0, rank - k))
        out[f"{m}.lora_A.weight"], out[f"{m}.lora_B.weight"] = a.float(), b.float()
        approx[m] = b @ a
    return out, relative_error(approx, exact)
