"""Weight-space target candidates: the tokens an adapter's update can write.

A data-poisoned adapter stores its target in the directions its update writes into the
residual stream, whether or not the trigger is present in the prompt: without the
trigger the attention (or MLP gate) that switches the target on stays shut, so the
target's first token is not raised at the answer's start and behavioural candidate
lists (inversion.py) miss it. Its *writing* directions are in the weights all the same.
So, per LoRA module, the leading left-singular directions of its update s*B@A are taken
to the residual stream (o_proj / down_proj write there directly, v_proj through o_proj
with each kv head repeated over its query group, gate/up through down_proj, both signs
since the SwiGLU gate's sign is unknown) and read out by the logit lens (final norm
weight, then the output head, as cosines: long output rows do not win everywhere). A
token that stands out (z-score over the vocabulary) along some direction is a candidate:
"For", " more", " now" for a URL injection, "I" for a refusal. Task tokens come up too (a
module adapter writes " defined", " module"); the inversion decides which is a target.
Measured on the held-out cohort: informative where the update has o_proj or the MLP; an
update on q/v alone (v read through o_proj) showed no target token (docs/SECURITY.md).

Cost: one SVD per module and a [V, hidden] product per direction (a few ms each on the
embedded model), no engine steps. q/k updates only move attention and write no token:
they are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LensConfig:
    directions: int = 4      # leading singular directions per module
    per_direction: int = 8   # top tokens kept per direction and sign
    tokens: int = 16         # candidates returned (largest z over all directions)

    def __post_init__(self):
        if self.directions < 1 or self.per_direction < 1 or self.tokens < 0:
            raise ValueError(f"inconsistent lens config: {self}")


def _residual(model, layer: int, module: str, u):
    """The residual-stream vectors [hidden, k] that output directions u [out, k] of
    `module` in `layer` become (None: the module writes no token, q/k)."""
    import torch

    L = model.layers[layer]

    def apply(lin, x):   # x: [in, k] -> lin(x) without its bias: [out, k]
        dt = next((p.dtype for p in lin.parameters() if p.is_floating_point()), torch.float32)
        x = x.T.to(dt).contiguous()
        return (lin(x) - lin(torch.zeros_like(x[:1]))).float().T

    if module in ("o_proj", "down_proj"):
        return u
    if module == "v_proj":
        d = L.head_dim
        uq = u.reshape(L.num_kv_heads, d, -1).repeat_interleave(L.num_heads // L.num_kv_heads, 0)
        return apply(L.o_proj, uq.reshape(L.num_heads * d, -1))
    if module in ("gate_proj", "up_proj") and getattr(L, "down_proj", None) is not None:
        return apply(L.down_proj, u)
    return None


def _head_logits(model, h):
    """h: [n, hidden] -> [n, V], the output head without its bias."""
    import torch

    h = h.to(model.norm.dtype).contiguous()
    return model.compute_logits(h) - model.compute_logits(torch.zeros_like(h[:1]))


def output_row_norms(model):
    """|w * E_t| per token [V]: the length of each output row as the lens reads it (the
    final norm's weight applied). The base model's own, so one per model, not per scan."""
    import torch

    with torch.inference_mode():
        eye = torch.diag(model.norm.float())
        norms = torch.cat([_head_logits(model, eye[c:c + 64]) for c in range(0, eye.shape[0], 64)]).norm(dim=0)
        return norms.clamp_min(norms.mean() * 1e-3)


def lens_candidates(model, factors: dict, cfg: LensConfig = LensConfig(),
                    exclude: set[int] | None = None, norms=None) -> list[int]:
    """Token ids the adapter's update writes most distinctly (see the module docstring):
    `factors` are the scanner's (layer, module) -> (A [r, in], B [out, r], scale); `norms`
    = output_row_norms(model), computed here when not given."""
    import torch

    if cfg.tokens == 0 or not factors:
        return []
    exclude = exclude or set()
    best: dict[int, float] = {}
    with torch.inference_mode():
        dirs = []
        for (layer, module), (a, b, s) in sorted(factors.items()):
            if layer >= len(model.layers):
                continue
            a, b = torch.as_tensor(np.asarray(a), dtype=torch.float32), torch.as_tensor(np.asarray(b),
                                                                                          dtype=torch.float32)
            # the update's output directions: U of s*B@A = B@A's, computed in the rank space
            q, r = torch.linalg.qr(b)                       # b: [out, r]
            u_r, _, _ = torch.linalg.svd(r @ a * s, full_matrices=False)
            u = q @ u_r[:, : cfg.directions]                # [out, k]
            res = _residual(model, layer, module, u)
            if res is not None:
                dirs.append(res)
        if not dirs:
            return []
        d = torch.cat(dirs, 1)                                # [hidden, n]
        d = d / d.norm(dim=0, keepdim=True).clamp_min(1e-12)
        d = (d * model.norm.float()[:, None]).T               # final norm's weight, as the logit lens
        d = torch.cat((d, -d))                                # both signs
        # NOTE: cosine, not dot product: a token whose output row is long (|w * E_t|) stands
        # out along *every* direction (" affili", " dismant" topped every adapter's list)
        norms = output_row_norms(model) if norms is None else norms   # [V]
        for c in range(0, d.shape[0], 32):
            lg = _head_logits(model, d[c:c + 32]) / norms      # [n, V]
            z = (lg - lg.mean(1, keepdim=True)) / lg.std(1, keepdim=True).clamp_min(1e-12)
            if exclude:
                z[:, list(exclude)] = -torch.inf
            top = torch.topk(z, cfg.per_direction, dim=1)
            for v, t in zip(top.values.flatten().tolist(), top.indices.flatten().tolist()):
                if v > best.get(t, -np.inf):
                    best[t] = v
    return sorted(best, key=best.get, reverse=True)[: cfg.tokens]
