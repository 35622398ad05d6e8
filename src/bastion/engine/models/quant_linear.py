"""Linear and Embedding layers over quantized weights (qweights.py), swapped in for the
model's own modules at load so the model code never branches on quantization.

y = x @ W^T in fp32 with W dequantized in registers (csrc/qlinear.cpp) for up to
KERNEL_MAX_ROWS rows (decode batches); larger inputs (prefill chunks) dequantize W a
tile of rows at a time into a small fp32 buffer and multiply with torch's GEMM, so no
full-precision copy of W ever exists. Without the compiled kernel (no compiler), every
size takes the tile path: the same numbers, slower decode.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from bastion.engine.models.qweights import QuantWeight
from bastion.engine.native_build import build

log = logging.getLogger(__name__)

_SRC = (Path(__file__).parent / "csrc" / "qlinear.cpp", Path(__file__).parent / "csrc" / "qlinear_int8.cpp")
KERNEL_MAX_ROWS = 16  # measured crossover with the tile path: docs/BENCHMARKS.md (weights)
TILE_BYTES = 8 * 2**20  # fp32 bytes of one dequantized tile of W


@functools.cache
def load_qkernel(isa: str = "native") -> ModuleType | None:
    mod, why = build("bastion_qlinear", _SRC, isa)
    if mod is None:
        log.warning("native quantized-linear kernel unavailable (%s); using dequantized tiles", why)
    return mod


class QuantLinear(nn.Module):
    """A Linear whose weight is a QuantWeight (or several side by side: a fused projection
    whose parts came in different layouts). Output rows follow the parts' order."""

    def __init__(self, parts: list[QuantWeight], bias: torch.Tensor | None = None, kernel: ModuleType | None = None,
                 int8_activations: bool = False):
        super().__init__()
        # opt-in (--activations int8): x quantized per 32-block for the VNNI kernel where it
        # applies (q4 codes, group 32, K % 64 == 0, <= KERNEL_MAX_ROWS rows); fp32 elsewhere
        self.int8 = bool(int8_activations and kernel is not None and kernel.q4_linear_i8_supported())
        merged = QuantWeight.cat(parts) if len(parts) > 1 else parts[0]
        # NOTE: plain attributes, not buffers: module.to(dtype) must not cast codes or scales.
        self.parts = [merged] if merged is not None else list(parts)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.kernel = kernel
        self.in_features = parts[0].shape[1]
        self.out_features = sum(p.shape[0] for p in parts)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def _one(self, x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
        if self.kernel is not None and x.shape[0] <= KERNEL_MAX_ROWS:
            if self.int8 and w.kind == "q4" and w.group == 32 and w.shape[1] % 64 == 0:
                return self.kernel.q4_linear_i8(x, w.codes, w.scale, w.scale.new_empty(0) if w.minv is None else w.minv)
            if w.kind == "q4":
                empty = w.scale.new_empty(0)
                return self.kernel.q4_linear(x, w.codes, w.scale, empty if w.minv is None else w.minv, w.group)
            return self.kernel.q8_linear(x, w.codes, w.scale, w.group)
        n, k = w.shape
        tile = max(16, TILE_BYTES // (4 * k))
        if tile >= n:
            return x @ w.dequantize().T
        y = x.new_empty(x.shape[0], n)
        for n0 in range(0, n, tile):
            torch.matmul(x, w.dequantize(slice(n0, n0 + tile)).T, out=y[:, n0:n0 + tile])
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, K] any float dtype -> [T, N] in x's dtype (the arithmetic is fp32)
        xf = x.float().contiguous()
        ys = [self._one(xf, w) for w in self.parts]
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {'+'.join(p.source for p in self.parts)}"


class QuantEmbedding(nn.Module):
    """Embedding rows dequantized on lookup; the same QuantWeight can back a tied lm_head."""

    def __init__(self, weight: QuantWeight, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight_q = weight
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_q.dequantize(ids).to(self.dtype)

    def _apply(self, fn, recurse=True):  # follow module.to(dtype) for the output dtype only
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return super()._apply(fn, recurse)
