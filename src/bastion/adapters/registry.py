"""Adapter registry: which LoRA adapters are loaded, in which slot of the stacked
weight tensors the model reads, and the vetting decision that let them in.

Slot 0 is "no adapter" (all zeros). Stacked per (layer, fused module):
  A: [max_loras + 1, R_cap, in], B: [max_loras + 1, out, R_cap]
with R_cap = max_lora_rank x (number of fused sub-modules), zero-padded, so a batch
mixing any adapters (and none) runs as two batched matmuls per projection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from bastion.adapters.lora import FUSED, AdapterError, LoraAdapter, load_peft_adapter, module_shapes
from bastion.engine.models.arch import ModelArch

log = logging.getLogger("bastion.adapters")


@dataclass(frozen=True)
class LoraConfig:
    max_loras: int = 8
    max_lora_rank: int = 64

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError("max_loras must be >= 1")
        if self.max_lora_rank < 1:
            raise ValueError("max_lora_rank must be >= 1")


class AdapterRegistry:
    def __init__(self, arch: ModelArch, config: LoraConfig, dtype: torch.dtype, device: torch.device):
        self.arch, self.config = arch, config
        shapes = module_shapes(arch)
        n = config.max_loras + 1
        self.stacks: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in range(arch.num_layers):
            for fused, subs in FUSED.items():
                r_cap = config.max_lora_rank * len(subs)
                fan_in = shapes[subs[0]][0]
                fan_out = sum(shapes[s][1] for s in subs)
                self.stacks[(layer, fused)] = (torch.zeros(n, r_cap, fan_in, dtype=dtype, device=device),
                                               torch.zeros(n, fan_out, r_cap, dtype=dtype, device=device))
        self.slot_of: dict[str, int] = {}
        self.adapters: dict[str, LoraAdapter] = {}

    def load(self, name: str, path: str) -> LoraAdapter:
        if name in self.slot_of:
            raise AdapterError(f"adapter {name!r} is already loaded")
        free = [s for s in range(1, self.config.max_loras + 1) if s not in self.slot_of.values()]
        if not free:
            raise AdapterError(f"all {self.config.max_loras} adapter slots are in use (--max-loras)")
        adapter = load_peft_adapter(name, path, self.arch)
        if adapter.rank > self.config.max_lora_rank:
            raise AdapterError(f"adapter rank {adapter.rank} exceeds --max-lora-rank {self.config.max_lora_rank}")
        slot = free[0]
        with torch.no_grad():
            for (layer, fused), (A, B) in adapter.weights.items():
                sA, sB = self.stacks[(layer, fused)]
                sA[slot].zero_()
                sB[slot].zero_()
                sA[slot, : A.shape[0]] = A.to(sA.dtype)
                sB[slot, :, : B.shape[1]] = B.to(sB.dtype)
        self.slot_of[name], self.adapters[name] = slot, adapter
        log.info("adapter %s loaded from %s into slot %d (rank %d)", name, path, slot, adapter.rank)
        return adapter

    def unload(self, name: str) -> None:
        slot = self.slot_of.pop(name, None)
        if slot is None:
            raise AdapterError(f"adapter {name!r} is not loaded")
        del self.adapters[name]
        with torch.no_grad():
            for sA, sB in self.stacks.values():
                sA[slot].zero_()
                sB[slot].zero_()

    def slot(self, name: str | None) -> int:
        if not name:
            return 0
        try:
            return self.slot_of[name]
        except KeyError:
            raise AdapterError(f"adapter {name!r} is not loaded") from None
