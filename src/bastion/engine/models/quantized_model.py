"""Putting quantized weights into a model by module swap (gpt-fast style): the model is
built on the meta device, every projection whose checkpoint tensors are QuantWeights
becomes a QuantLinear (fused q/k/v and gate/up kept fused), the embedding a
QuantEmbedding (a tied lm_head reads the same codes: one copy), and only what is left
(norms, any fp projection) is materialised and loaded as usual. No step holds a
full-precision copy of a quantized matrix. Experts of an MoE layer become one QuantLinear
pair per expert (moe.ModuleExperts), its shared expert two QuantLinears; routers stay fp."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn

from bastion.engine.models.arch import ModelArch
from bastion.engine.models.llama import LlamaForCausalLM, rope_tables
from bastion.engine.models.moe import ModuleExperts, MoEMLP
from bastion.engine.models.quant_linear import QuantEmbedding, QuantLinear
from bastion.engine.models.qweights import QuantWeight

# fused module -> the HF tensors it is made of, in row order
_FUSED = {"qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "o_proj": ("self_attn.o_proj",), "gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
          "down_proj": ("mlp.down_proj",)}


def has_quantized(weights: dict) -> bool:
    return any(isinstance(w, QuantWeight) for w in weights.values())


def build_quantized(arch: ModelArch, max_len: int, weights: dict, kernel: ModuleType | None,
                    activations: str = "auto", experts: Callable[[nn.Module], None] | None = None
                    ) -> LlamaForCausalLM:
    """The model (fp32 everywhere but the swapped modules) with `weights` loaded. `experts`:
    installs experts loaded elsewhere (moe_offload.install), called while the model is still
    on the meta device, so the experts' dense placeholders are never allocated.
    NOTE: consumes `weights` (entries are popped as they are installed)."""
    def swap(parts: list, bias: list | None, pack: bool = False) -> QuantLinear | None:
        if not all(isinstance(p, QuantWeight) for p in parts):
            return None
        return QuantLinear(parts, None if bias is None else torch.cat(bias), kernel, activations, pack=pack)

    with torch.device("meta"):
        model = LlamaForCausalLM(arch, max_len)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        if layer.mlp is not None:
            _swap_moe(layer.mlp, weights, p + "mlp.", swap)
        for attr, names in _FUSED.items():
            if not hasattr(layer, attr):  # an MoE layer's dense MLP
                continue
            parts = [weights.get(p + n + ".weight") for n in names]
            biases = [weights.get(p + n + ".bias") for n in names]
            q = swap(parts, biases if getattr(layer, attr).bias is not None else None, pack=True)
            if q is not None:
                setattr(layer, attr, q)
                for n in names:
                    weights.pop(p + n + ".weight"), weights.pop(p + n + ".bias", None)
    emb = weights.get("model.embed_tokens.weight")
    if isinstance(emb, QuantWeight):
        model.embed_tokens = QuantEmbedding(emb)
    head = emb if arch.tie_word_embeddings else weights.get("lm_head.weight")
    if isinstance(head, QuantWeight):
        model.lm_head = QuantLinear([head], None, kernel, activations)
        weights.pop("lm_head.weight", None)
    if experts is not None:
        experts(model)
    _materialize(model)
    model.rope_cos, model.rope_sin = rope_tables(arch, max_len, torch.device("cpu"))
    model.load_hf_state_dict(weights)
    return model.eval()


def _materialize(model: nn.Module) -> None:
    """Meta parameters and buffers -> uninitialized CPU tensors of their shape; tensors
    already real (the swapped modules' biases) are kept. Module.to_empty does this for all
    of them through torch._refs, whose first use imports dynamo and sympy (+40 MB resident)."""
    for m in model.modules():
        for name, t in list(m._parameters.items()):
            if t is not None and t.is_meta:
                m._parameters[name] = nn.Parameter(torch.empty(t.shape, dtype=t.dtype), requires_grad=t.requires_grad)
        for name, t in list(m._buffers.items()):
            if t is not None and t.is_meta:
                m._buffers[name] = torch.empty(t.shape, dtype=t.dtype)


def _swap_moe(mlp: MoEMLP, weights: dict, prefix: str, swap) -> None:
    """Quantized experts -> one (gate_up, down) QuantLinear pair each, where every expert's
    parts are quantized (else they load dense); the shared expert's projections likewise."""
    ex, n = prefix + "experts.", mlp.num_experts
    groups = {"gate_up": [[f"{ex}{e}.gate_proj.weight", f"{ex}{e}.up_proj.weight"] for e in range(n)],
              "down": [[f"{ex}{e}.down_proj.weight"] for e in range(n)]}
    mods = {k: [swap([weights.get(name) for name in g], None) for g in gs] for k, gs in groups.items()}
    if all(m is not None for ms in mods.values() for m in ms):
        mlp.experts = ModuleExperts(mods["gate_up"], mods["down"])
        for gs in groups.values():
            for name in (name for g in gs for name in g):
                weights.pop(name)
    if mlp.shared_gate_up is None:
        return
    sp = prefix + "shared_expert."
    for attr, names in (("shared_gate_up", [sp + "gate_proj.weight", sp + "up_proj.weight"]),
                        ("shared_down", [sp + "down_proj.weight"])):
        q = swap([weights.get(name) for name in names], None)
        if q is not None:
            setattr(mlp, attr, q)
            for name in names:
                weights.pop(name)


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights as held in memory: parameters, buffers (RoPE tables)
    and quantized codes + scales (a tied head's codes counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():
        ws = m.parts if isinstance(m, QuantLinear) else [m.weight_q] if isinstance(m, QuantEmbedding) else []
        for w in ws:
            if w.codes.data_ptr() not in seen:
                seen.add(w.codes.data_ptr())
                total += w.nbytes
    return total
