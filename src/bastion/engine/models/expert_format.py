"""What an offloaded expert's bytes become before it runs (expert offload, moe_offload.py).

The store (expert_store.py) hands out an expert's three spans as tensors, over the mmap
or read into RAM. Dense spans (F32/F16/BF16) are the weights themselves, cast to the
model's dtype where the file's differs. A GGUF's quantized spans (Q4_0, Q4_1, Q4_K,
Q8_0, Q6_K) are raw blocks: they are repacked (qweights.from_gguf, the loader's own
repacking) into the QuantLinear pair build_quantized makes for a resident expert, gate
and up fused. So an offloaded quantized expert runs the same kernel on the same codes as
a resident one, and every policy's logits equal the resident quantized model's, bit for
bit (tests/engine/models/test_moe_offload_quantized.py).

A streamed quantized expert is repacked on every use, one read into the RAM tier once:
that is on the decode path, so Q4_0/Q4_1/Q8_0 blocks are split by the kernel's
gguf_split_blocks where it is built (gate and up straight into one matrix: 0.20 ms per
1.4 MiB SmolLM2-MoE expert, numpy's record copy 0.63 ms; measured on the Zen 4 VM).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from bastion.engine.models.moe import ModuleExperts
from bastion.engine.models.quant_linear import QuantLinear
from bastion.engine.models.qweights import from_gguf, from_gguf_native

Dense = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate [I, H], up [I, H], down [H, I]


@dataclass(frozen=True)
class ExpertFormat:
    dtype: torch.dtype  # the model's: dense experts are cast to it
    kernel: ModuleType | None = None  # quantized experts' kernel (quant_linear.load_qkernel); None: torch ops
    activations: str = "auto"  # quantized experts' activations (ModelConfig.activations)

    @staticmethod
    def of(fmt: "ExpertFormat | torch.dtype") -> "ExpertFormat":
        """A format as given, or dense experts in the given dtype."""
        return fmt if isinstance(fmt, ExpertFormat) else ExpertFormat(fmt)

    def weights(self, spans, raw) -> Dense | ModuleExperts:
        """The runnable weights of one expert from its spans' tensors (store.view or read)."""
        if spans[0].qtype is None:
            return tuple(t if t.dtype == self.dtype else t.to(self.dtype) for t in raw)
        sg, su, _ = spans
        if sg.qtype == su.qtype and sg.shape[1] == su.shape[1]:
            gu = [self._repack(spans[:2], raw[:2])]  # gate and up as one matrix, as _swap_moe fuses them
        else:  # parts in different layouts: QuantLinear keeps them apart (as QuantWeight.cat does)
            gu = [self._repack([s], [r]) for s, r in zip(spans[:2], raw[:2])]
        d = self._repack(spans[2:], raw[2:])
        if None in gu or d is None:
            raise ValueError(f"expert spans of types {[s.qtype for s in spans]}: not a kept quantized type")
        # NOTE: _swap_moe's construction (quantized_model.py): gate+up fused, no packing
        return ModuleExperts([QuantLinear(gu, None, self.kernel, self.activations)],
                             [QuantLinear([d], None, self.kernel, self.activations)])

    def _repack(self, spans, raw):
        """The rows of spans of one type and width as one QuantWeight: row-wise the same as
        repacking each and concatenating (QuantWeight.cat), one copy less. The kernel's
        splitter where it takes the type (Q4_0/Q4_1/Q8_0), else from_gguf (None: not kept)."""
        split = getattr(self.kernel, "gguf_split_blocks", None)
        if split is not None and (w := from_gguf_native(spans[0].qtype, raw, spans[0].shape[1], split)) is not None:
            return w
        data = raw[0].numpy() if len(raw) == 1 else np.concatenate([r.numpy() for r in raw])
        return from_gguf(spans[0].qtype, data, sum(s.shape[0] for s in spans), spans[0].shape[1])

    def resident_bytes(self, store, key) -> int:
        """Bytes one expert of `store` holds in the RAM tier (every expert is the same size)."""
        spans = store.spans[key]
        if spans[0].qtype is None:
            return sum(s.shape[0] * s.shape[1] for s in spans) * self.dtype.itemsize
        # repacked codes + scales: the blocks' size for Q4_0/Q4_1/Q8_0, more for the K types
        # (their 6-bit sub-block scales become fp32 per 32 or 16 values)
        w = self.weights(spans, store.view(key))
        store.release(key)
        return w.gate_up[0].nbytes + w.down[0].nbytes
