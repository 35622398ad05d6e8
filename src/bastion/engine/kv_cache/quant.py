"""KIVI-class KV quantization (arXiv 2402.02750): the numeric core, as pure tensor functions.

Keys are quantized per channel: each group of G consecutive tokens gets, for every
(kv head, channel), its own fp16 scale s and minimum m. Values are quantized per token:
each token gets, for every (kv head, group of G channels), its own s and m. Both are
asymmetric min-max with round-to-nearest: code c = round((x - m) / s) in [0, 2^b - 1],
x_hat = s * c + m. The newest tokens stay in a full-precision window; only complete
G-token groups that have left it are quantized, once (see `split_context`).

Invariant that makes the round-trip bound exact (|x - x_hat| <= s/2 for every element,
up to fp32 arithmetic): m is the fp16 value rounded DOWN from the true minimum and s is
rounded UP, so every x lies in [m, m + s * (2^b - 1)] and clamping never adds error.
Inputs must lie within the fp16 range (|x| < 65504), which K/V activations do.

Storage layouts (token-major, like the fp pool's [slots, kv_heads, D]):
  keys:   codes [n_groups, G, H, D*kb/8] uint8, scale/zero [n_groups, H, D] fp16
  values: codes [T, H, D*vb/8] uint8,          scale/zero [T, H, D/Gv] fp16
(Gv = the value channel group, G unless set apart: one range per head at Gv = D)
Codes are packed along the last axis, little-endian within a byte: code i of a row sits
in byte i // (8/b) at bit offset (i % (8/b)) * b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

_BITS = (2, 4, 8)
_FP16_BYTES = 2


@dataclass(frozen=True)
class KVQuantSpec:
    """k_bits / v_bits in {2, 4, 8}; group_size G = token-group length for keys (and the
    block size); v_group_size Gv = channel-group length for values (None: G);
    residual R = minimum full-precision window."""

    k_bits: int = 4
    v_bits: int = 4
    group_size: int = 32
    residual: int = 128
    # MSE-optimal clipping of VALUE groups: a group's range may shrink toward its midpoint
    # (factors in _CLIP) when that lowers its squared error. Trades the s/2 bound on the
    # extremes for less error on the rest; once per group at quantization time. Keys are
    # never clipped: measured, clipped keys cost far more perplexity than they save in
    # MSE (attention logits depend on the outlier channels that clipping cuts).
    clip: bool = False
    v_group_size: int | None = None

    @property
    def value_group(self) -> int:
        """Gv: channels per value scale/min (G unless v_group_size is set)."""
        return self.group_size if self.v_group_size is None else self.v_group_size

    def __post_init__(self):
        for name in ("k_bits", "v_bits"):
            b = getattr(self, name)
            if b not in _BITS:
                raise ValueError(f"{name}={b!r}: must be one of {_BITS}")
        g = self.group_size
        # G * 2 bits must fill whole bytes so a channel group of packed value codes is
        # byte-aligned (the attention kernel permutes packed bytes per group).
        if not isinstance(g, int) or g <= 0 or g % 4:
            raise ValueError(f"group_size={g!r}: must be a positive multiple of 4")
        gv = self.v_group_size
        if gv is not None and (not isinstance(gv, int) or gv <= 0 or gv % 4):
            raise ValueError(f"v_group_size={gv!r}: must be a positive multiple of 4")
        if not isinstance(self.residual, int) or self.residual < 0:
            raise ValueError(f"residual={self.residual!r}: must be an int >= 0")

    def check_head_dim(self, head_dim: int) -> None:
        """Values group Gv channels of D, so Gv must divide D."""
        gv = self.value_group
        if head_dim <= 0 or head_dim % gv:
            name = "group_size" if self.v_group_size is None else "v_group_size"
            raise ValueError(f"{name}={gv} must divide head_dim={head_dim}")


class QuantKeys(NamedTuple):
    codes: torch.Tensor  # [..., G, H, D*kb/8] uint8 (one G-token group per leading index)
    scale: torch.Tensor  # [..., H, D] fp16
    zero: torch.Tensor  # [..., H, D] fp16 (the group minimum)


class QuantValues(NamedTuple):
    codes: torch.Tensor  # [..., H, D*vb/8] uint8 (one token per leading index)
    scale: torch.Tensor  # [..., H, D/Gv] fp16
    zero: torch.Tensor  # [..., H, D/Gv] fp16


def split_context(spec: KVQuantSpec, ctx_len: int) -> tuple[int, int]:
    """(quantized tokens, fp window tokens) for a sequence of ctx_len tokens: the prefix
    is the largest multiple of G leaving >= R tokens in the window, so the window holds
    min(ctx_len, R .. R+G-1) tokens and a group is quantized exactly once when it leaves."""
    n_q = max(0, ctx_len - spec.residual) // spec.group_size * spec.group_size
    return n_q, ctx_len - n_q


# ---------------------------------------------------------------- packing

def _shifts(bits: int, device) -> torch.Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)  # [8/b]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., N] uint8 in [0, 2^b) -> [..., N*b/8] uint8 (N*b must be a multiple of 8)."""
    if bits not in _BITS:
        raise ValueError(f"bits={bits!r}: must be one of {_BITS}")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    per, n = 8 // bits, codes.shape[-1]
    if n % per:
        raise ValueError(f"last dim {n} is not a multiple of {per} ({bits}-bit packing)")
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], n // per, per)
    out = c[..., 0].clone()
    for i in range(1, per):  # over bit positions (<= 3), not elements
        out |= c[..., i] << (i * bits)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """packed [..., Np] uint8 -> codes [..., Np*8/b] uint8 (inverse of `pack`)."""
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    c = (packed.unsqueeze(-1) >> _shifts(bits, packed.device)) & mask  # [..., Np, 8/b]
    return c.flatten(-2)


def unpack_float(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """packed [..., Np] uint8 -> codes as fp32 [..., Np*8/b] (for the attention matmuls).
    Writes each bit position straight into the strided fp32 output: ~3x faster on CPU
    than a broadcast shift + dtype conversion (measured, one thread)."""
    if bits == 8:
        return packed.to(torch.float32)
    packed = packed.contiguous()  # strided uint8 reads cost ~2x; the byte copy is cheap
    per, mask = 8 // bits, (1 << bits) - 1
    out = torch.empty(*packed.shape, per, dtype=torch.float32, device=packed.device)
    out[..., 0] = packed & mask
    for i in range(1, per - 1):  # over bit positions (<= 2), not elements
        out[..., i] = (packed >> (i * bits)) & mask
    out[..., per - 1] = packed >> (8 - bits)
    return out.flatten(-2)


# ---------------------------------------------------------------- quantize / dequantize

def _round_fp16(x: torch.Tensor, up: bool) -> torch.Tensor:
    """fp32/fp64 -> fp16 rounded toward +inf (up) or -inf (down), exactly (compare + step)."""
    h = x.to(torch.float16)
    hf = h.float()
    bad = (hf < x) if up else (hf > x)
    step = torch.full_like(h, float("inf") if up else float("-inf"))
    return torch.where(bad, torch.nextafter(h, step), h)


_CLIP = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def _grid(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: int):
    """Codes uint8, scale, zero (fp16) for the range [lo, hi] (zero rounded down, scale up)."""
    zero = _round_fp16(lo, up=False)  # m <= lo
    zf = zero.float()
    # fp64: (hi - m) / L is then within 2^-53 of exact, so s*L >= hi - m really holds
    scale = _round_fp16((hi.double() - zf.double()) / levels, up=True)
    sf = scale.float()
    # s == 0 only if hi == m exactly: every x == m, code 0 reconstructs exactly.
    div = torch.where(sf > 0, sf, torch.ones_like(sf))
    codes = torch.round((x - zf) / div).clamp_(0, levels).to(torch.uint8)
    return codes, scale, zero


def _minmax_quant(x: torch.Tensor, dim: int, bits: int, clip: bool = False):
    """Asymmetric min-max over `dim` (kept). x fp32. Returns codes uint8 (same shape as x),
    scale, zero fp16 (dim reduced to size 1). clip: per group, the shrink of [min, max]
    toward its midpoint (from _CLIP) with the least squared reconstruction error."""
    levels = (1 << bits) - 1
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    best = _grid(x, lo, hi, levels)
    if not clip:
        return best
    mid, half = (lo + hi) / 2, (hi - lo) / 2

    def err(q):
        return ((q[0].float() * q[1].float() + q[2].float() - x) ** 2).sum(dim, keepdim=True)

    best_err = err(best)
    for f in _CLIP[1:]:
        cand = _grid(x, mid - f * half, mid + f * half, levels)
        e = err(cand)
        better = e < best_err
        best = tuple(torch.where(better, c, b) for c, b in zip(cand, best))
        best_err = torch.minimum(e, best_err)
    return best


def quantize_keys(k: torch.Tensor, spec: KVQuantSpec) -> QuantKeys:
    """k [n_groups*G, H, D] -> QuantKeys(codes [n_groups, G, H, D*kb/8],
    scale/zero [n_groups, H, D]): per channel over each G-token group."""
    t, h, d = k.shape
    g = spec.group_size
    if t % g:
        raise ValueError(f"{t} key tokens is not a whole number of groups of {g}")
    if d * spec.k_bits % 8:
        raise ValueError(f"head_dim={d} cannot be packed at {spec.k_bits} bits")
    x = k.float().reshape(t // g, g, h, d)
    codes, scale, zero = _minmax_quant(x, dim=1, bits=spec.k_bits)  # scale [n, 1, H, D]
    return QuantKeys(pack(codes, spec.k_bits), scale.squeeze(1), zero.squeeze(1))


def quantize_values(v: torch.Tensor, spec: KVQuantSpec) -> QuantValues:
    """v [T, H, D] -> QuantValues(codes [T, H, D*vb/8], scale/zero [T, H, D/Gv]):
    per token over groups of Gv channels."""
    t, h, d = v.shape
    spec.check_head_dim(d)
    g = spec.value_group
    x = v.float().reshape(t, h, d // g, g)
    codes, scale, zero = _minmax_quant(x, dim=-1, bits=spec.v_bits, clip=spec.clip)  # scale [T, H, D/G, 1]
    return QuantValues(pack(codes.reshape(t, h, d), spec.v_bits), scale.squeeze(-1), zero.squeeze(-1))


def dequantize_keys(kq: QuantKeys, spec: KVQuantSpec) -> torch.Tensor:
    """Reference: QuantKeys [n, G, H, Dp] -> fp32 [n*G, H, D] (test oracle / debugging)."""
    c = unpack_float(kq.codes, spec.k_bits)  # [n, G, H, D]
    x = c * kq.scale.float().unsqueeze(1) + kq.zero.float().unsqueeze(1)
    return x.reshape(-1, *x.shape[2:])


def dequantize_values(vq: QuantValues, spec: KVQuantSpec) -> torch.Tensor:
    """Reference: QuantValues [T, H, Dp] -> fp32 [T, H, D] (test oracle / debugging)."""
    c = unpack_float(vq.codes, spec.v_bits)  # [T, H, D]
    t, h, d = c.shape
    c = c.view(t, h, d // spec.value_group, spec.value_group)
    x = c * vq.scale.float().unsqueeze(-1) + vq.zero.float().unsqueeze(-1)
    return x.reshape(t, h, d)


# ---------------------------------------------------------------- memory accounting

def bytes_per_token(spec: KVQuantSpec, num_layers: int, num_kv_heads: int, head_dim: int) -> float:
    """Bytes one QUANTIZED token occupies across all layers: packed K and V codes plus
    fp16 scale + min (keys: 2 per channel per G tokens; values: 2 per Gv channels)."""
    spec.check_head_dim(head_dim)
    d = head_dim
    k = d * spec.k_bits / 8 + 2 * _FP16_BYTES * d / spec.group_size
    v = d * spec.v_bits / 8 + 2 * _FP16_BYTES * d / spec.value_group
    return num_layers * num_kv_heads * (k + v)


def bytes_per_token_at(spec: KVQuantSpec, num_layers: int, num_kv_heads: int, head_dim: int,
                       ctx_len: int, fp_bytes: int = _FP16_BYTES) -> float:
    """Average bytes per token of one ctx_len-token sequence, the fp window (R..R+G-1
    tokens at fp_bytes per element, K and V) amortised in."""
    if ctx_len <= 0:
        raise ValueError("ctx_len must be positive")
    n_q, n_w = split_context(spec, ctx_len)
    fp = 2 * num_layers * num_kv_heads * head_dim * fp_bytes
    return (n_q * bytes_per_token(spec, num_layers, num_kv_heads, head_dim) + n_w * fp) / ctx_len


# ---------------------------------------------------------------- Hadamard rotation

def hadamard(d: int, device=None) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix [d, d] fp32 (d a power of two). Symmetric and
    its own inverse, so rotating both q and k by it leaves q . k unchanged."""
    if d <= 0 or d & (d - 1):
        raise ValueError(f"Hadamard size {d} must be a power of two")
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < d:  # log2(d) doublings
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(d)


def rotate(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x [..., D] -> x @ H in fp32 (apply to keys before quantize_keys and to q at attention)."""
    return x.float() @ h
