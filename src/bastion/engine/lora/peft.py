"""PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors) read onto the
engine's fused projections.

Our layers fuse q/k/v into `qkv_proj` and gate/up into `gate_up_proj`, so an adapter's
factors are kept per sub-module of a fused projection (batch.py applies them). The scale
s = lora_alpha / r (or / sqrt(r) with rsLoRA) is folded into B.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from bastion.engine.models.arch import ModelArch
from bastion.safe_io import read_regular

# fused module -> its PEFT sub-modules, in output order
FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}
SUB_TO_FUSED = {sub: fused for fused, subs in FUSED.items() for sub in subs}
MAX_CONFIG_BYTES = 1 << 20  # adapter_config.json (the gate's own limit is smaller)
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be served on this base model; the message says why."""


def module_shapes(arch: ModelArch) -> dict[str, tuple[int, int]]:
    """PEFT module name -> (in_features, out_features) on this base."""
    h, i, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    return {
        "q_proj": (h, arch.num_heads * d), "k_proj": (h, arch.num_kv_heads * d),
        "v_proj": (h, arch.num_kv_heads * d), "o_proj": (arch.num_heads * d, h),
        "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
    }


@dataclass
class LoraAdapter:
    name: str
    path: str
    rank: int  # largest per-module rank
    # (layer, fused module) -> per sub-module (in FUSED order): (A [r, in], s*B [out, r]) or None
    weights: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor] | None]]


def load_peft_adapter(name: str, path: str | Path, arch: ModelArch) -> LoraAdapter:
    """Read adapter_config.json + adapter_model.safetensors (never a pickle)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, w_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file() or not w_file.is_file():
        raise AdapterError(f"{path}: expected adapter_config.json and adapter_model.safetensors")
    try:
        cfg = json.loads(read_regular(cfg_file, MAX_CONFIG_BYTES))
    except (OSError, ValueError) as e:
        raise AdapterError(f"{cfg_file}: {e}") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_file}: not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    try:
        tensors = load_file(str(w_file))
    except Exception as e:  # safetensors raises its own error type on a corrupt file
        raise AdapterError(f"{w_file}: not a readable safetensors file ({e})") from e
    shapes = module_shapes(arch)
    per_sub: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None or m.group(3) not in shapes:
            raise AdapterError(f"{path}: unexpected tensor {key!r}")
        layer, sub = int(m.group(1)), m.group(3)
        if layer >= arch.num_layers:
            raise AdapterError(f"{path}: {key} targets layer {layer}; the base has {arch.num_layers}")
        if m.group(2) == "mlp" and arch.is_moe_layer(layer):
            raise AdapterError(f"{path}: {key} targets the MLP of layer {layer}, a mixture-of-experts layer "
                               "(LoRA on experts is not supported; attention projections are)")
        per_sub.setdefault((layer, sub), {})[m.group(4)] = t.float()
    alpha, r0 = cfg.get("lora_alpha", cfg.get("r", 8)), cfg.get("r", 8)
    weights, max_rank = {}, 0
    for (layer, fused), subs in _group_by_fused(per_sub).items():
        parts: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for sub in FUSED[fused]:
            ab = subs.get(sub)
            if ab is None:
                parts.append(None)
                continue
            a, b = ab.get("A"), ab.get("B")
            if a is None or b is None:
                raise AdapterError(f"{path}: layer {layer} {sub} lacks lora_A or lora_B")
            r = a.shape[0]
            if a.shape != (r, shapes[sub][0]) or b.shape != (shapes[sub][1], r):
                raise AdapterError(f"{path}: layer {layer} {sub} shapes A{tuple(a.shape)} B{tuple(b.shape)} "
                                   f"do not fit in={shapes[sub][0]} out={shapes[sub][1]}")
            r_cfg = cfg.get("rank_pattern", {}).get(sub, r0)
            a_cfg = cfg.get("alpha_pattern", {}).get(sub, alpha)
            if r != r_cfg:
                raise AdapterError(f"{path}: layer {layer} {sub} has rank {r}, config says {r_cfg}")
            scale = a_cfg / math.sqrt(r) if cfg.get("use_rslora") else a_cfg / r
            parts.append((a, b * scale))
            max_rank = max(max_rank, r)
        weights[(layer, fused)] = parts
    if not weights:
        raise AdapterError(f"{path}: the adapter holds no LoRA tensors")
    return LoraAdapter(name=name, path=str(path), rank=max_rank, weights=weights)


def _group_by_fused(per_sub):
    out: dict[tuple[int, str], dict[str, dict[str, torch.Tensor]]] = {}
    for (layer, sub), ab in per_sub.items():
        out.setdefault((layer, SUB_TO_FUSED[sub]), {})[sub] = ab
    return out
