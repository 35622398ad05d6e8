"""Linear and Embedding layers over quantized weights (qweights.py), swapped in for the
model's own modules at load so the model code never branches on quantization.

Up to KERNEL_MAX_ROWS rows (decode batches) go to the native kernel; up to INT_MAX_ROWS
of them (batch-1 decode) take integer activations (`activations`):
- int16 (auto's choice where the CPU has AVX512-VNNI, for q4/q8 weights of group 32): x
  quantized per 32-block to 16-bit codes taken as two bytes through VNNI dot products
  (csrc/qlinear_int8.cpp); answers as fp32 activations' to ~1e-5 relative per matmul;
- fp32: W dequantized in registers, fp32 FMAs (csrc/qlinear.cpp): the exact oracle path,
  and auto's choice for other layouts (Q6_K, group 128) and CPUs without VNNI;
- int8 (opt-in): llama.cpp's per-block int8 through the same kernel, fastest, answers
  measurably different.
Decoder projections of q4 weights with group 32 are packed at load where the integer
path runs (`pack=True`; qweights.PackedQ4, csrc/qlinear_packed.cpp): 16 rows interleaved
per tile, so every decode batch (1..KERNEL_MAX_ROWS rows) takes integer activations
through one VNNI kernel that unpacks each tile once for all rows (measured, 1 thread,
[11264, 2048] Q4_0, ms: 1 row int16 1.05 -> 0.63; 8 rows fp32 7.81 -> int16 3.36), and so
do prefill rows, in int16 whatever decode takes. Larger inputs on other layouts (prefill
chunks) dequantize W a tile of rows at a time into a small fp32 buffer and multiply with
torch's GEMM, so no full-precision copy of W ever exists.
Without the compiled kernel (no compiler), every size takes the tile path: the fp32
numbers, slower decode.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from bastion.config import ACTIVATIONS
from bastion.engine.models.qweights import PACK_ROWS, PackedQ4, QuantWeight
from bastion.engine.native_build import build

log = logging.getLogger(__name__)

# the model's CPU kernels, one module: quantized linears, the fused layer ops (layer_ops.py) and
# the whole-step decode (fused_decode.py), which also calls the fp32 cache's decode attention
_KERNELS = tuple(Path(__file__).parent / "csrc" / f for f in ("bindings.cpp", "qlinear.cpp", "qlinear_int8.cpp",
                                                                "qlinear_packed.cpp", "decode_ops.cpp",
                                                                "gguf_blocks.cpp"))
_SRC = _KERNELS + (Path(__file__).parent / "csrc" / "decode_layers.cpp",
                   Path(__file__).parents[1] / "kv_cache" / "csrc" / "fp_decode.cpp")
KERNEL_MAX_ROWS = 16  # measured crossover with the tile path: docs/BENCHMARKS.md (weights)
# integer activations for batch-1 rows only: from 2 rows the fp32 kernel's multi-row bodies
# read W once for all rows and catch up (measured, 2 threads, [4096, 11008] Q4_0, ms:
# 1 row int16 0.76 / fp32 1.53; 2 rows 1.77 / 1.91; 3 rows 3.06 / 2.02)
INT_MAX_ROWS = 1
TILE_BYTES = 8 * 2**20  # fp32 bytes of one dequantized tile of W


@functools.cache
def load_qkernel(isa: str = "native") -> ModuleType | None:
    # A lower ISA than the machine's is only built to test the kernels' fallback bodies: it
    # leaves the decode plan out (the plan only calls those kernels), halving its build time.
    mod, why = (build("bastion_qlinear", _SRC, isa) if isa == "native"
                else build("bastion_qlinear", _KERNELS, isa, defines=("BASTION_KERNELS_ONLY",)))
    if mod is None:
        log.warning("native quantized-linear kernel unavailable (%s); using dequantized tiles", why)
    return mod


class QuantLinear(nn.Module):
    """A Linear whose weight is a QuantWeight (or several side by side: a fused projection
    whose parts came in different layouts). Output rows follow the parts' order."""

    def __init__(self, parts: list[QuantWeight], bias: torch.Tensor | None = None, kernel: ModuleType | None = None,
                 activations: str = "auto", pack: bool = False):
        super().__init__()
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
        merged = QuantWeight.cat(parts) if len(parts) > 1 else parts[0]
        # NOTE: plain attributes, not buffers: module.to(dtype) must not cast codes or scales.
        self.parts = [merged] if merged is not None else list(parts)
        # pack: q4 parts of group 32 become PackedQ4 (the tiled VNNI kernel of every decode batch)
        # where the integer path runs; the caller says so only for weights nothing else reads
        # (not a tied head, whose codes the embedding reads)
        if pack and kernel is not None and hasattr(kernel, "q4p_pack") and activations != "fp32" \
                and kernel.q4_linear_i8_supported():
            self.parts = [PackedQ4.pack(w, kernel) if PackedQ4.can_pack(w) else w for w in self.parts]
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.kernel = kernel
        self.in_features = parts[0].shape[1]
        self.out_features = sum(p.shape[0] for p in parts)
        # per part: (fp32 kernel call, integer-activation call, its name); None: not here
        self._calls = [_kernel_calls(w, kernel, activations) for w in self.parts]
        self.activations = sorted({a for *_, a in self._calls})

    @property
    def int8(self) -> bool:
        return "int8" in self.activations

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def _one(self, x: torch.Tensor, i: int) -> torch.Tensor:
        fp32, integer, _ = self._calls[i]
        w = self.parts[i]
        if isinstance(w, PackedQ4) and x.shape[0] > KERNEL_MAX_ROWS:
            # prefill rows of packed parts: int16 activations whatever decode takes, as precise as
            # fp32 for the answers (tests/serving: 100% of HF fp32's greedy answers) and faster than
            # fp32 GEMMs over dequantized tiles (measured, 1 thread, Zen 4, [11264, 2048] Q4_0, 256
            # rows: tiles 137 ms, int16 63). Not int8 even where named: its prompt rounding took
            # SmolLM2's greedy agreement with HF from 75% to 44%.
            return self.kernel.q4p_linear(x, w.packed, w.has_min, w.f32, True)
        if integer is not None and x.shape[0] <= INT_MAX_ROWS:
            return integer(x)
        if fp32 is not None and x.shape[0] <= KERNEL_MAX_ROWS:
            return fp32(x)
        n, k = w.shape
        tile = max(PACK_ROWS, TILE_BYTES // (4 * k)) // PACK_ROWS * PACK_ROWS  # whole packed tiles
        if tile >= n:
            return x @ self._dequant(w, slice(0, n)).T
        y = x.new_empty(x.shape[0], n)
        for n0 in range(0, n, tile):
            torch.matmul(x, self._dequant(w, slice(n0, n0 + tile)).T, out=y[:, n0:n0 + tile])
        return y

    def _dequant(self, w: QuantWeight | PackedQ4, rows: slice) -> torch.Tensor:
        # fp32 [rows, K]: the native loop where built (bit-equal; measured 0.45 vs 1.3 ms per 8 MB tile)
        if isinstance(w, PackedQ4):
            stop = min(rows.stop, w.shape[0])
            return self.kernel.q4p_dequant(w.packed, rows.start // PACK_ROWS, stop // PACK_ROWS, w.has_min, w.f32)
        if self.kernel is None:
            return w.dequantize(rows)
        if w.kind == "q4":
            minv = w.scale.new_empty(0) if w.minv is None else w.minv[rows]
            return self.kernel.q4_dequant(w.codes[rows], w.scale[rows], minv, w.group)
        return self.kernel.q8_dequant(w.codes[rows], w.scale[rows], w.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, K] any float dtype -> [T, N] in x's dtype (the arithmetic is fp32 or finer)
        xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
        y = self._one(xf, 0) if len(self.parts) == 1 else torch.cat([self._one(xf, i) for i in range(len(self.parts))], -1)
        if self.bias is not None:
            y = y + self.bias
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {'+'.join(p.source for p in self.parts)}, "
                f"activations={'+'.join(self.activations)}")


def _kernel_calls(w: QuantWeight, kernel: ModuleType | None, activations: str):
    """(fp32 kernel call or None, integer-activation call or None, its name): callables x -> y."""
    if kernel is None:
        return None, None, "fp32"
    if isinstance(w, PackedQ4):  # every decode batch on the integer path (the rows share each unpacked W)
        int16, name = activations != "int8", "int8" if activations == "int8" else "int16"
        fp = kernel.q4p_linear
        call = (lambda x: fp(x, w.packed, w.has_min, w.f32, int16))
        return call, call, name
    k, c, s, g = w.shape[1], w.codes, w.scale, w.group
    m = s.new_empty(0) if w.minv is None else w.minv  # empty: symmetric (Q4_0-like)
    if w.kind == "q4":
        f = kernel.q4_linear
        fp32 = lambda x: f(x, c, s, m, g)
    else:
        f8 = kernel.q8_linear
        fp32 = lambda x: f8(x, c, s, g)
    if activations != "fp32" and g == 32 and k % 64 == 0 and kernel.q4_linear_i8_supported():
        int16, name = activations != "int8", "int8" if activations == "int8" else "int16"
        if w.kind == "q4":
            fi = kernel.q4_linear_i8
            return fp32, (lambda x: fi(x, c, s, m, int16)), name
        fq = kernel.q8_linear_i8
        return fp32, (lambda x: fq(x, c, s, int16)), name
    return fp32, None, "fp32"


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
