"""Quantized weights as the kernels read them, repacked once at load (never dequantized to
a full-precision copy): GGUF blocks of Q4_0, Q4_1, Q4_K, Q8_0 and Q6_K, or fp weights
quantized group-wise (`--quantize int8|int4`).

Two layouts (csrc/qlinear.cpp reads them):
- q4: codes uint8 [N, K/2], 32-groups of 16 bytes, byte j = element j (low nibble) |
  element j+16 (high nibble) -- GGUF's own Q4_0/Q4_1 order; scale [N, K/G]; minv
  [N, K/G] or None (symmetric: min = -8 * scale). w = scale * code + min.
  Q4_0 (min = -8d), Q4_1 (d, m) map onto it exactly with their fp16 scales; Q4_K
  (d*sc, -dmin*m per 32) exactly with fp32 ones (fp16 x 6-bit products are exact in fp32).
- q8: codes int8 [N, K], scale [N, K/G]; w = scale * code. Q8_0 (G=32, fp16 scales)
  and Q6_K (G=16, d * int8 scale in fp32) map onto it exactly.
Resident bytes vs the file: Q4_0, Q4_1, Q8_0 1.0x (the same bytes, split into arrays),
Q4_K 1.33x, Q6_K 1.5x (fp32 scales, so the mapping stays exact). --quantize int8/int4
use fp16 scales (codes computed against the rounded scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

QUANTIZE_CHOICES = ("auto", "none", "int8", "int4")
GROUP_CHOICES = (32, 128)
# GGUF types kept quantized (others are dequantized to the compute dtype)
GGUF_KEPT = ("Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q6_K")


@dataclass
class QuantWeight:
    kind: str  # "q4" | "q8"
    codes: torch.Tensor  # q4: uint8 [N, K/2]; q8: int8 [N, K]
    scale: torch.Tensor  # fp16 or fp32 [N, K/G]
    minv: torch.Tensor | None  # q4 only: [N, K/G], scale's dtype; None = symmetric (-8 * scale)
    group: int
    source: str  # what it was made from: "Q4_1", "int4-g32", ...

    @property
    def shape(self) -> tuple[int, int]:
        n = self.codes.shape[0]
        return n, self.codes.shape[1] * (2 if self.kind == "q4" else 1)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.minv) if t is not None)

    def take_rows(self, index: torch.Tensor | slice) -> "QuantWeight":
        pick = (lambda t: None if t is None else t[index].contiguous())
        return QuantWeight(self.kind, pick(self.codes), pick(self.scale), pick(self.minv), self.group, self.source)

    def dequantize(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """fp32 [n, K] of the given rows (all by default): the reference the kernel is
        held to, the tiles of large GEMMs, and the embedding lookup."""
        w = self if rows is None else self.take_rows(rows)
        n, k = w.shape
        if self.kind == "q4":
            c = w.codes.view(n, k // 32, 16)
            vals = torch.cat((c & 0x0F, c >> 4), dim=-1).view(n, k // self.group, self.group).float()
            scale = w.scale.float()
            mn = -8.0 * scale if w.minv is None else w.minv.float()
            return torch.addcmul(mn[..., None], vals, scale[..., None]).view(n, k)
        return (w.codes.view(n, k // self.group, self.group).float() * w.scale.float()[..., None]).view(n, k)

    @staticmethod
    def cat(parts: list["QuantWeight"]) -> "QuantWeight | None":
        """Row-wise concatenation (fused q/k/v, gate/up), or None where the parts differ in
        layout (a Q4_K_M file's Q6_K v next to Q4_K q, k): the caller keeps them apart."""
        a = parts[0]
        if any(p.kind != a.kind or p.group != a.group or p.shape[1] != a.shape[1] for p in parts):
            return None
        dt = torch.float16 if all(p.scale.dtype == torch.float16 for p in parts) else torch.float32
        minv = None
        if a.kind == "q4" and any(p.minv is not None for p in parts):
            minv = torch.cat([(p.minv if p.minv is not None else -8.0 * p.scale.float()).to(dt) for p in parts])
        sources = sorted({p.source for p in parts})
        return QuantWeight(a.kind, torch.cat([p.codes for p in parts]), torch.cat([p.scale.to(dt) for p in parts]),
                           minv, a.group, "+".join(sources))


PACK_ROWS = 16  # rows per tile of the packed q4 layout (csrc/qlinear_packed.cpp)


@dataclass
class PackedQ4:
    """A q4 QuantWeight of group 32 repacked for the VNNI kernel of every decode batch
    (csrc/qlinear_packed.cpp): tiles of 16 interleaved rows, each 32-group's codes, scales
    and mins in one record, W read as one stream. It replaces the QuantWeight (same bytes)."""
    packed: torch.Tensor  # uint8 [N/16, K/32, record]
    has_min: bool
    f32: bool  # fp32 scales (Q4_K) rather than fp16
    source: str
    kind = "q4p"
    group = 32

    @staticmethod
    def can_pack(w: QuantWeight) -> bool:
        return w.kind == "q4" and w.group == 32 and w.shape[0] % PACK_ROWS == 0 and w.shape[1] % 64 == 0

    @classmethod
    def pack(cls, w: QuantWeight, kernel) -> "PackedQ4":
        minv = w.scale.new_empty(0) if w.minv is None else w.minv
        return cls(kernel.q4p_pack(w.codes, w.scale, minv), w.minv is not None, w.scale.dtype == torch.float32,
                   w.source)

    @property
    def codes(self) -> torch.Tensor:  # the one tensor that holds it (resident_bytes dedupes by it)
        return self.packed

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0] * PACK_ROWS, self.packed.shape[1] * 32

    @property
    def nbytes(self) -> int:
        return self.packed.numel()

    def unpack(self) -> QuantWeight:
        """The QuantWeight it was packed from (tests; pure torch)."""
        t, nb, _ = self.packed.shape
        ss = 4 if self.f32 else 2
        dt = torch.float32 if self.f32 else torch.float16
        rec = self.packed
        # codes: [t, nb, 4 chunks, 16 rows, 4 bytes] -> [t, 16 rows, nb, 4 chunks * 4 bytes]
        codes = rec[..., :256].reshape(t, nb, 4, PACK_ROWS, 4).permute(0, 3, 1, 2, 4).reshape(t * PACK_ROWS, nb * 16)
        side = lambda o: rec[..., 256 + o:256 + o + PACK_ROWS * ss].contiguous().view(dt).permute(0, 2, 1) \
            .reshape(t * PACK_ROWS, nb)
        scale = side(0).contiguous()
        minv = side(PACK_ROWS * ss).contiguous() if self.has_min else None
        return QuantWeight("q4", codes.contiguous(), scale, minv, 32, self.source)


# ---------------------------------------------------------------- GGUF blocks -> layouts
# one block of 32 weights as a record: scale d (fp16), Q4_1's min m (fp16), the codes
_BLOCK_DTYPES = {
    "Q4_0": np.dtype([("d", "<f2"), ("qs", "u1", (16,))]),
    "Q4_1": np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))]),
    "Q8_0": np.dtype([("d", "<f2"), ("qs", "i1", (32,))]),
}


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _pack_q4(vals: np.ndarray) -> np.ndarray:
    """vals uint8 [..., 32] (0..15) -> bytes [..., 16]: element j | element j+16 << 4."""
    return (vals[..., :16] | (vals[..., 16:] << 4)).astype(np.uint8)


def from_gguf_native(type_name: str, parts: list[torch.Tensor], k: int, split) -> QuantWeight | None:
    """The rows of several raw GGUF tensors of one type (uint8, whole rows of K = k) as one
    repacked matrix, by the kernel's `gguf_split_blocks` (`split`); equal to from_gguf on
    their concatenation. None for a type that splitter does not take."""
    if type_name not in _BLOCK_DTYPES:
        return None
    bb = _BLOCK_DTYPES[type_name].itemsize
    n = sum(p.numel() for p in parts) // (k // 32 * bb)
    codes, d, *m = split(list(parts), bb, 4 if type_name == "Q4_1" else 2)
    d, minv = d.view(n, k // 32), (m[0].view(n, k // 32) if m else None)
    if type_name == "Q8_0":
        return QuantWeight("q8", codes.view(torch.int8).view(n, k), d, None, 32, type_name)
    return QuantWeight("q4", codes.view(n, k // 2), d, minv, 32, type_name)


def from_gguf(type_name: str, data: np.ndarray, n: int, k: int) -> QuantWeight | None:
    """Repack one GGUF tensor (`data`: its raw bytes, uint8) of logical shape [n, k]; None
    for a type kept dense. Every value the kernel reads equals gguf's own dequantization."""
    data = np.asarray(data, dtype=np.uint8).reshape(n, -1)
    if type_name in _BLOCK_DTYPES:
        # NOTE: the blocks read as records (fp16 d [, fp16 m], codes): a field copies in one pass
        # (~15x faster than gathering strided 2-byte slices; offloaded experts repack on every use)
        rec = np.ascontiguousarray(data).reshape(-1).view(_BLOCK_DTYPES[type_name]).reshape(n, k // 32)
        d = torch.from_numpy(np.ascontiguousarray(rec["d"]))
        if type_name == "Q8_0":
            return QuantWeight("q8", torch.from_numpy(np.ascontiguousarray(rec["qs"]).reshape(n, k)), d, None, 32,
                               type_name)
        minv = torch.from_numpy(np.ascontiguousarray(rec["m"])) if type_name == "Q4_1" else None
        codes = np.ascontiguousarray(rec["qs"]).reshape(n, k // 2)
        return QuantWeight("q4", torch.from_numpy(codes), d, minv, 32, type_name)
    if type_name == "Q4_K":
        import gguf.quants as gq

        blocks = data.reshape(n * (k // 256), 144)
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])  # [B, 1]
        sc, mn = gq.Q4_K.get_scale_min(blocks[:, 4:16])  # [B, 8] each, 6-bit
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        vals = (qs & 0x0F).reshape(-1, 8, 32)  # sub-block s of a super-block: 32 codes
        scale = (d * sc.astype(np.float32)).reshape(n, k // 32)
        minv = (-(dmin * mn.astype(np.float32))).reshape(n, k // 32)
        codes = _pack_q4(vals).reshape(n, k // 2)
        return QuantWeight("q4", torch.from_numpy(codes), torch.from_numpy(scale), torch.from_numpy(minv), 32, type_name)
    if type_name == "Q6_K":
        blocks = data.reshape(n * (k // 256), 210)
        ql, qh = blocks[:, :128], blocks[:, 128:192]
        sc = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)  # [B, 16]
        d = _f16(blocks[:, 208:210])  # [B, 1]
        lo = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        hi = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
        q = (lo.reshape(-1, 2, 4, 32) | (hi.reshape(-1, 2, 4, 32) << 4)).astype(np.int8) - np.int8(32)
        codes = q.reshape(n, k)
        scale = (d * sc).reshape(n, k // 16)
        return QuantWeight("q8", torch.from_numpy(np.ascontiguousarray(codes)), torch.from_numpy(scale), None, 16, type_name)
    return None


# ---------------------------------------------------------------- fp weights -> layouts
def quantize(w: torch.Tensor, bits: int, group: int) -> QuantWeight:
    """Group-wise round-to-nearest: int8 symmetric (absmax / 127), int4 asymmetric
    (min/max over 15 steps). w: [N, K] float, K a multiple of 32; where `group` does not
    divide K (SmolLM2's 576 by 128) that tensor uses groups of 32."""
    n, k = w.shape
    if group not in GROUP_CHOICES:
        raise ValueError(f"quantization group {group}: expected one of {GROUP_CHOICES}")
    if k % 32:
        raise ValueError(f"cannot quantize a [{n}, {k}] weight: K must be a multiple of 32")
    group = group if k % group == 0 else 32
    g = w.detach().float().reshape(n, k // group, group)
    half = (lambda t: t.to(torch.float16).float())  # NOTE: codes are computed against the stored fp16 scale
    if bits == 8:
        scale = half(g.abs().amax(-1) / 127.0)
        codes = torch.round(g / torch.where(scale > 0, scale, 1.0)[..., None]).clamp_(-127, 127).to(torch.int8)
        return QuantWeight("q8", codes.reshape(n, k), scale.half().contiguous(), None, group, f"int8-g{group}")
    if bits == 4:
        lo, hi = half(g.amin(-1)), g.amax(-1)
        scale = half((hi - lo) / 15.0)
        codes = torch.round((g - lo[..., None]) / torch.where(scale > 0, scale, 1.0)[..., None]).clamp_(0, 15)
        codes = codes.to(torch.uint8).reshape(n, k // 32, 32)
        packed = (codes[..., :16] | (codes[..., 16:] << 4)).reshape(n, k // 2)
        return QuantWeight("q4", packed.contiguous(), scale.half().contiguous(), lo.half().contiguous(), group,
                           f"int4-g{group}")
    raise ValueError(f"bits must be 4 or 8, not {bits}")
