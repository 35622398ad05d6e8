"""Adapter registry: which LoRA adapters are loaded, in which slot of the stacked
weight tensors the model reads, and the vetting decision that let them in.

Slot 0 is "no adapter" (all zeros). Stacked per (layer, fused module):
  A_T: [max_loras + 1, in, subs * R]  (sub-module i's ranks in columns i*R .. i*R + r_i)
  B_T_i: [max_loras + 1, R, out_i]     one per sub-module, at output column offset col_i
with R = max_lora_rank, zero-padded, so a batch mixing any adapters (and none) runs as
batched matmuls over a slice of slots. Stored transposed (contiguous operands for bmm)
and, on CPU, in fp32: torch's CPU bmm at these shapes measured ~2x faster in fp32
than bf16, and the deltas are small next to the base GEMMs.
"""

from __future__ import annotations

import logging

import torch

from bastion.config import AdapterConfig
from bastion.engine.lora.peft import FUSED, AdapterError, LoraAdapter, load_peft_adapter, module_shapes
from bastion.engine.models.arch import ModelArch

log = logging.getLogger("bastion.adapters")


class AdapterRegistry:
    def __init__(self, arch: ModelArch, config: AdapterConfig, dtype: torch.dtype, device: torch.device):
        self.arch, self.config = arch, config
        if device.type == "cpu":
            dtype = torch.float32
        shapes = module_shapes(arch)
        n = config.max_loras + 1
        self.stacks: dict[tuple[int, str], tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]] = {}
        r = config.max_lora_rank
        for layer in range(arch.num_layers):
            for fused, subs in FUSED.items():
                A = torch.zeros(n, shapes[subs[0]][0], r * len(subs), dtype=dtype, device=device)
                Bs, col = [], 0
                for sub in subs:
                    Bs.append((col, torch.zeros(n, r, shapes[sub][1], dtype=dtype, device=device)))
                    col += shapes[sub][1]
                self.stacks[(layer, fused)] = (A, Bs)
        self.slot_of: dict[str, int] = {}
        self.adapters: dict[str, LoraAdapter] = {}
        self._plans: dict[frozenset[int], dict[tuple[int, str], tuple[int, ...]]] = {}
        self._loads = 0   # loads so far: each load gets its own prefix-cache key
        self._cache_key: dict[str, str] = {}

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
        self._clear(slot)
        r_cap = self.config.max_lora_rank
        with torch.no_grad():
            for (layer, fused), parts in adapter.weights.items():
                sA, sBs = self.stacks[(layer, fused)]
                for i, part in enumerate(parts):
                    if part is not None:
                        a, b = part
                        sA[slot, :, i * r_cap : i * r_cap + a.shape[0]] = a.t().to(sA.dtype)
                        sBs[i][1][slot, : b.shape[1]] = b.t().to(sA.dtype)
        self.slot_of[name], self.adapters[name] = slot, adapter
        self._loads += 1
        self._cache_key[name] = f"{name}#{self._loads}"
        self._plans.clear()
        log.info("adapter %s loaded from %s into slot %d (rank %d)", name, path, slot, adapter.rank)
        return adapter

    def unload(self, name: str) -> None:
        slot = self.slot_of.pop(name, None)
        if slot is None:
            raise AdapterError(f"adapter {name!r} is not loaded")
        del self.adapters[name], self._cache_key[name]
        self._plans.clear()
        self._clear(slot)

    def cache_key(self, name: str) -> str:
        """This load of adapter `name` (prefix-cache namespace: unloading it and loading
        other weights under the same name must not reuse its cached KV)."""
        return self._cache_key[name]

    def _clear(self, slot: int) -> None:
        with torch.no_grad():
            for sA, sBs in self.stacks.values():
                sA[slot].zero_()
                for _, sB in sBs:
                    sB[slot].zero_()

    def plan(self, slots: frozenset[int]) -> dict[tuple[int, str], tuple[int, ...]]:
        """(layer, fused module) -> sub-modules (sorted) that any of these slots' adapters
        targets; memoised per slot set until the next load/unload."""
        plan = self._plans.get(slots)
        if plan is None:
            merged: dict[tuple[int, str], set[int]] = {}
            for name, slot in self.slot_of.items():
                if slot in slots:
                    for key, parts in self.adapters[name].weights.items():
                        merged.setdefault(key, set()).update(i for i, part in enumerate(parts) if part is not None)
            plan = self._plans[slots] = {key: tuple(sorted(v)) for key, v in merged.items() if v}
        return plan

    def slot(self, name: str | None) -> int:
        if not name:
            return 0
        try:
            return self.slot_of[name]
        except KeyError:
            raise AdapterError(f"adapter {name!r} is not loaded") from None
