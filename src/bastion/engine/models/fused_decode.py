"""A decode step through every decoder layer in one native call (csrc/decode_layers.cpp).

Measured on SmolLM2-135M Q4_1 at batch 1 (2 threads): the kernels take ~3.9 ms of a 6.0 ms
step; the rest was Python and op dispatch, ~50 calls per layer. The plan holds each
layer's quantized weights once (built at load) and runs the same kernels in the same order
as the per-op path, so its answers are bit-identical to it (the test's oracle).

It runs when the step is only single-token rows (decodes), at most KERNEL_MAX_ROWS of
them, every projection is a QuantLinear with a native kernel, the KV cache offers its fp32
pools in place (`KVCache.decode_pools`), and no adapter adds a delta this step; any other
step takes the per-op path.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from bastion.engine.kv_cache.base import AttentionMetadata, KVCache
from bastion.engine.models.quant_linear import (
    INT_MAX_ROWS,
    KERNEL_MAX_ROWS,
    QuantLinear,
)
from bastion.engine.models.qweights import PackedQ4

PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # the plan's order
_MODES = {"fp32": 0, "int16": 1, "int8": 2}


class FusedDecode:
    def __init__(self, plan, layers: nn.ModuleList):
        self.plan = plan
        self.layers = layers  # to see the LoRA wrappers installed later (their `active`)

    @classmethod
    def build(cls, model: nn.Module, kernel: ModuleType | None) -> FusedDecode | None:
        """The plan for `model`, or None where some projection is not a native QuantLinear or
        some layer is not the plain Llama layer the plan runs (experts, q/k norms, clamps)."""
        if kernel is None or not hasattr(kernel, "DecodePlan") or not model.arch.plain_layers:
            return None
        arch = model.arch
        plan = kernel.DecodePlan(arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.rms_norm_eps)
        for i, layer in enumerate(model.layers):
            plan.add_layer(layer.input_layernorm.detach(), layer.post_attention_layernorm.detach())
            for j, name in enumerate(PROJECTIONS):
                m = getattr(layer, name)
                m = getattr(m, "base", m)  # a LoRA wrapper's base projection
                if not isinstance(m, QuantLinear) or any(fp32 is None for fp32, _, _ in m._calls):
                    return None
                for w, (_, integer, act) in zip(m.parts, m._calls):
                    if isinstance(w, PackedQ4):  # its kernel runs every batch size on the integer path
                        plan.add_packed(i, j, w.packed, w.has_min, w.f32, _MODES[act])
                        continue
                    minv = w.scale.new_empty(0) if w.minv is None else w.minv
                    mode = _MODES[act] if integer is not None else 0
                    plan.add_part(i, j, w.codes, w.scale, minv, w.kind == "q4", w.group, mode)
                if m.bias is not None:
                    plan.set_bias(i, j, m.bias.detach())
        return cls(plan, model.layers)

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
            kv: KVCache) -> bool:
        """x [T, hidden] (updated in place through every layer) -> whether it ran; False:
        the caller runs the per-op path instead."""
        t = x.shape[0]
        if t > KERNEL_MAX_ROWS or meta.num_decodes != t or x.dtype != torch.float32 or cos.dtype != torch.float32:
            return False
        pools = kv.decode_pools(meta)
        if pools is None or self._adapters_active():
            return False
        k, v, table, lens, block, scale = pools
        self.plan.run(x, k, v, meta.slot_mapping, table, lens, block, scale, cos.contiguous(), sin.contiguous(),
                      t <= INT_MAX_ROWS)
        return True

    def _adapters_active(self) -> bool:
        layer = self.layers[0]
        return any(getattr(getattr(layer, name), "active", False) for name in PROJECTIONS)
