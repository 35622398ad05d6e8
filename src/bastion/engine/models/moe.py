"""Mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): a router picks each token's
top-k experts, each expert is a SwiGLU MLP of its own.

Routing follows transformers 5.x (its modeling files are the oracle): router logits in the
activations' dtype, softmax in fp32, top-k of the probabilities (the same experts picked),
renormalised to sum to 1 where the family does (Mixtral always, the others when
`norm_topk_prob`); the weighted sum of the expert outputs runs finer than HF's
(_combine_dtype). Qwen2-MoE adds a shared expert every token takes, scaled by
sigmoid(shared_expert_gate(x)).

Dispatch is token-grouped: the T*k (token, expert) pairs are sorted by expert, each active
expert runs one GEMM pair over its rows, and the weighted rows are added back with one
index_add. Experts are held as stacked tensors (gate_up [E, 2I, H], down [E, H, I]: HF's
own fused layout) or, for quantized checkpoints, as one pair of modules per expert
(quantized_model.py builds them), or offloaded to the file they came from
(moe_offload.OffloadedExperts); the dispatch does not care which.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bastion.engine.models.arch import ModelArch
from bastion.engine.models.linear import Linear

# Mixtral's checkpoint names (block_sparse_moe, w1 = gate, w3 = up, w2 = down) -> the
# names every other family uses, which the model loads
_MIXTRAL_EXPERT = re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w([123])\.")
_W = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}


def canonical_name(name: str) -> str:
    """An HF checkpoint tensor name in the model's naming (Mixtral's renamed; others as is)."""
    if ".block_sparse_moe." not in name:
        return name
    name = _MIXTRAL_EXPERT.sub(lambda m: f".mlp.experts.{m.group(1)}.{_W[m.group(2)]}.", name)
    return name.replace(".block_sparse_moe.gate.", ".mlp.gate.")


def _combine_dtype(dtype: torch.dtype) -> torch.dtype:
    """The top-k renormalisation and the weighted sum of the experts' outputs run one step
    finer than the activations (fp64 for fp32, fp32 for bf16/fp16), then round once. HF
    rounds each product and partial sum in the activations' dtype (or fp32); the difference
    is below one rounding of the activations, and it makes the weights of an upcycled
    model's identical experts sum to exactly 1: its MoE output is the dense MLP's, bit for
    bit, wherever the expert GEMMs are (upcycle.py)."""
    return torch.float64 if dtype == torch.float32 else torch.float32


class StackedExperts(nn.Module):
    """Every expert's weights in two stacked tensors (dense fp32/bf16)."""

    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden), requires_grad=False)
        self.down = nn.Parameter(torch.empty(num_experts, hidden, inter), requires_grad=False)

    def forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gu = F.linear(x, self.gate_up[e])
        i = gu.shape[-1] // 2
        return F.linear(F.silu(gu[:, :i]) * gu[:, i:], self.down[e])


class ModuleExperts(nn.Module):
    """One (gate_up, down) module pair per expert (e.g. QuantLinears over GGUF blocks)."""

    def __init__(self, gate_up: list[nn.Module], down: list[nn.Module]):
        super().__init__()
        self.gate_up, self.down = nn.ModuleList(gate_up), nn.ModuleList(down)

    def forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up[e](x)
        i = gu.shape[-1] // 2
        return self.down[e](F.silu(gu[:, :i]) * gu[:, i:])


class MoEMLP(nn.Module):
    def __init__(self, arch: ModelArch):
        super().__init__()
        h, e = arch.hidden_size, arch.num_experts
        self.num_experts, self.top_k, self.norm_topk = e, arch.num_experts_per_tok, arch.norm_topk_prob
        # NOTE: a plain nn.Linear: no fp16/packed shadow may change which experts are picked
        self.gate = nn.Linear(h, e, bias=False).requires_grad_(False)
        self.experts: nn.Module = StackedExperts(e, h, arch.moe_intermediate_size)
        s = arch.shared_expert_intermediate_size
        self.shared_gate_up = Linear(h, 2 * s, bias=False) if s else None
        self.shared_down = Linear(s, h, bias=False) if s else None
        self.shared_gate = nn.Linear(h, 1, bias=False).requires_grad_(False) if s else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] in the combine's dtype, expert ids [T, k])."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        w = w.to(_combine_dtype(x.dtype))
        if self.norm_topk:
            w = w / w.sum(dim=-1, keepdim=True)
        return w, idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H] (post-attention-normed) -> [T, H], a fresh tensor
        w, idx = self.route(x)
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        rows = torch.div(order, self.top_k, rounding_mode="floor")  # each sorted pair's token
        xs = x.index_select(0, rows)
        active = [e for e, n in enumerate(counts) if n]
        starts = dict(zip(active, itertools.accumulate([0] + [counts[e] for e in active])))
        # an offloaded expert set (moe_offload.py) picks the order the experts run in (resident
        # ones first, while missing ones are read); the outputs are combined in expert order
        # whatever it is, so the numbers do not depend on it
        schedule = getattr(self.experts, "schedule", None)
        done = {e: self.experts(e, xs[starts[e]:starts[e] + counts[e]])
                for e in (schedule(active, counts, x) if schedule is not None else active)}
        outs = [done[e] for e in active]
        ys = torch.cat(outs) if len(outs) != 1 else outs[0]
        ys = ys.to(w.dtype) * w.reshape(-1)[order].unsqueeze(1)
        out = torch.zeros_like(x, dtype=w.dtype).index_add_(0, rows, ys).to(x.dtype)
        if self.shared_gate_up is not None:
            gu = self.shared_gate_up(x)
            i = gu.shape[-1] // 2
            shared = self.shared_down(F.silu(gu[:, :i]) * gu[:, i:])
            out += torch.sigmoid(self.shared_gate(x)) * shared
        return out

    def load(self, weights: dict, take: Callable[[str], torch.Tensor], prefix: str) -> None:
        """Load from HF names under `prefix` (model.layers.N.mlp.): per-expert tensors
        (experts.E.gate_proj.weight, ...) or HF's fused ones (experts.gate_up_proj [E, 2I, H],
        experts.down_proj [E, H, I]). Modules swapped in already loaded are left alone."""
        self.gate.weight.copy_(take(prefix + "gate.weight"))
        if isinstance(self.experts, StackedExperts):
            ex, n = prefix + "experts.", self.num_experts
            if ex + "gate_up_proj" in weights:
                self.experts.gate_up.copy_(take(ex + "gate_up_proj"))
                self.experts.down.copy_(take(ex + "down_proj"))
            else:
                for e in range(n):
                    g, u = take(f"{ex}{e}.gate_proj.weight"), take(f"{ex}{e}.up_proj.weight")
                    self.experts.gate_up[e, : g.shape[0]].copy_(g)
                    self.experts.gate_up[e, g.shape[0]:].copy_(u)
                    self.experts.down[e].copy_(take(f"{ex}{e}.down_proj.weight"))
        if self.shared_gate_up is None:
            return
        sp = prefix + "shared_expert."
        if isinstance(self.shared_gate_up, nn.Linear):
            self.shared_gate_up.weight.copy_(torch.cat([take(sp + "gate_proj.weight"), take(sp + "up_proj.weight")]))
        if isinstance(self.shared_down, nn.Linear):
            self.shared_down.weight.copy_(take(sp + "down_proj.weight"))
        self.shared_gate.weight.copy_(take(prefix + "shared_expert_gate.weight").reshape(1, -1))
