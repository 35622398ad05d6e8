"""The fused CPU decode-attention kernels: the KIVI cache's (csrc/kivi_decode.cpp) and
the fp32 cache's (csrc/fp_decode.cpp: reads the pool through the block table, no gathered
copy, one op instead of ~12), one module compiled on first use with torch's JIT extension
builder and cached on disk.

Why a native kernel: in torch ops a quantized decode step unpacks codes into an fp32
tile, scales it and multiplies in separate passes over memory (~55% of the time went to
unpacking at batch 1); the fused kernel reads each token's packed bytes once, keeps the
query rows and the value accumulators in planar order so the unpack vectorises, and
splits the context across cores (flash-decoding). Measured at 4k context, one layer:
3-4x faster than the torch path (docs/BENCHMARKS.md).

The build needs a C++ compiler and ninja (a dependency); it takes ~25 s once per
machine (torch caches it under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions,
keyed by the source and flags). `kernel="auto"` falls back to the torch path, with a
warning naming the reason, when the build fails; `"native"` raises instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType

import torch

from bastion.engine.native_build import build

log = logging.getLogger(__name__)

_SRC = (Path(__file__).parent / "csrc" / "kivi_decode.cpp", Path(__file__).parent / "csrc" / "fp_decode.cpp")
KERNELS = ("auto", "native", "torch")
HEAD_DIMS = (64, 128)  # instantiated in the kernel


def _build() -> tuple[ModuleType | None, str]:
    return build("bastion_kivi_decode", _SRC)


def load_kernel(kernel: str, head_dim: int) -> ModuleType | None:
    """The compiled module for `kernel` (auto/native/torch), or None for the torch path."""
    if kernel not in KERNELS:
        raise ValueError(f"kv kernel {kernel!r}: expected one of {KERNELS}")
    if kernel == "torch":
        return None
    if head_dim not in HEAD_DIMS:
        if kernel == "native":
            raise ValueError(f"the native KIVI kernel supports head_dim {HEAD_DIMS}, not {head_dim}")
        return None
    return _built(kernel, "KIVI decode")


def load_fp_kernel(kernel: str) -> ModuleType | None:
    """The module for the fp32 cache's decode attention (any head_dim), or None."""
    if kernel not in KERNELS:
        raise ValueError(f"kv kernel {kernel!r}: expected one of {KERNELS}")
    if kernel == "torch":
        return None
    return _built(kernel, "decode-attention")


def _built(kernel: str, what: str) -> ModuleType | None:
    """The built module; a failed build raises under "native", warns and gives None under "auto"."""
    mod, why = _build()
    if mod is None:
        if kernel == "native":
            raise RuntimeError(f"the native {what} kernel did not build ({why})")
        log.warning("native %s kernel unavailable (%s); using the torch path", what, why)
    return mod


def native_decode_attention(mod: ModuleType, qg: torch.Tensor, kq, vq, table: torch.Tensor,
                            block_mask: torch.Tensor, k_fp: torch.Tensor, v_fp: torch.Tensor,
                            window_mask: torch.Tensor, k_bits: int, v_bits: int) -> torch.Tensor:
    """qg [B, H, M, D] fp32 pre-scaled; kq/vq pool tensors of one layer (quant_attention's
    pool form); table/block_mask [B, n]; k_fp/v_fp [B, w, H, D]; window_mask [B, w]
    -> [B, H, M, D] fp32. Splits each (sequence, head) so that every core has work."""
    b, h = qg.shape[:2]
    n = table.shape[1]
    splits = max(1, min(n // 4, -(-4 * torch.get_num_threads() // (b * h))))
    kq, vq = (tuple(t.contiguous() for t in x) for x in (kq, vq))  # no-ops for the cache's pools
    return mod.kivi_decode_attention(
        qg.contiguous(), *kq, *vq,
        table.contiguous(), block_mask.contiguous(), k_fp.float().contiguous(), v_fp.float().contiguous(),
        window_mask.contiguous(), k_bits, v_bits, splits)
