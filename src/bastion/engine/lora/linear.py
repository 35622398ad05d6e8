"""LoRA by module swap (gpt-fast style): while adapters are enabled, every projection
the adapters can target is wrapped in a `LoraLinear`, which adds the rows' adapter deltas
to the base projection's output. The step's grouping of rows by adapter slot (a
`LoraStep`) is set once per step on the shared `LoraContext` by the model runner, so the
model code passes nothing and branches on nothing."""

from __future__ import annotations

import torch
from torch import nn

from bastion.engine.lora.batch import LoraBatch, LoraStep
from bastion.engine.lora.peft import FUSED
from bastion.engine.lora.registry import AdapterRegistry


class LoraContext:
    """This step's LoraStep (None: no row has an adapter), shared by every LoraLinear."""

    def __init__(self, registry: AdapterRegistry) -> None:
        self.registry = registry
        self.step: LoraStep | None = None

    def begin(self, segments: list[tuple[int, int]], device: torch.device) -> None:
        """segments: (adapter slot, rows) in row order; slot 0 = no adapter."""
        batch = LoraBatch.build(segments, device)
        self.step = None if batch is None else LoraStep(
            self.registry.stacks, batch, self.registry.plan(frozenset(s for s, _ in segments) - {0}))

    def end(self) -> None:
        self.step = None


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module, layer: int, name: str, ctx: LoraContext) -> None:
        super().__init__()
        self.base, self.layer, self.name, self.ctx = base, layer, name, ctx

    @property
    def active(self) -> bool:
        """Whether this step adds adapter deltas (else the wrapper is the base projection)."""
        return self.ctx.step is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # x: [T, in] -> out: [T, out], a fresh tensor: the deltas add in place
        step = self.ctx.step
        if step is not None:
            step.apply(self.layer, self.name, out, x)
        return out


def install(model: nn.Module, registry: AdapterRegistry) -> LoraContext:
    """Wrap every fused projection of every layer (idempotent: wrapped ones are re-pointed)."""
    ctx = LoraContext(registry)
    for i, layer in enumerate(model.layers):
        for name in FUSED:
            current = getattr(layer, name, None)
            if current is None:  # an MoE layer has experts instead of gate_up/down (peft.py refuses those)
                continue
            base = current.base if isinstance(current, LoraLinear) else current
            setattr(layer, name, LoraLinear(base, i, name, ctx))
    return ctx
