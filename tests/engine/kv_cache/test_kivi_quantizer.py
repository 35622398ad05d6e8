"""KIVI quantizer core (kv_cache/quant.py) against exact bounds: spec validation and
byte accounting, bit packing, and the quantizer round trip.

- Quantizer round trip, per bit width b: with the stored fp16 min m rounded down and the
  stored fp16 scale s rounded up, every x lies in [m, m + s(2^b - 1)], so round-to-nearest
  gives |x - (s c + m)| <= s/2 exactly. The codes are computed in fp32: t = (x - m)/s
  carries a relative error <= 2^-23 (subtraction + division, 2^-24 each) on |t| <= 2^b, so
  the nearest integer can miss by at most 2^(b-23) more code units. Reconstructing in
  fp64 the bound checked is |x - x_hat| <= s (1/2 + 2^(b-22)) (a factor 2 of slack).
- Clipping the value range never increases a group's error (and helps at 2 bits); keys
  are never clipped.

The quantized attention built on it is tested in test_kivi_quant.py.
"""

from __future__ import annotations

import pytest
import torch

from bastion.engine.kv_cache.quant import (
    KVQuantSpec, bytes_per_token, bytes_per_token_at, dequantize_keys, dequantize_values, pack, quantize_keys,
    quantize_values, split_context, unpack, unpack_float,
)

from tests.support.kivi import kv_data, one_thread  # noqa: F401  (autouse fixture)

BITS = (2, 4, 8)


# ---------------------------------------------------------------- spec / accounting

@pytest.mark.parametrize("kw", [dict(k_bits=3), dict(v_bits=16), dict(group_size=0), dict(group_size=6),
                                dict(group_size=-4), dict(residual=-1), dict(v_group_size=0),
                                dict(v_group_size=6)])
def test_spec_validation(kw):
    with pytest.raises(ValueError):
        KVQuantSpec(**kw)


def test_head_dim_and_group_checks():
    spec = KVQuantSpec(4, 2, 32, 0)
    spec.check_head_dim(64)
    with pytest.raises(ValueError):
        spec.check_head_dim(48)
    with pytest.raises(ValueError):
        quantize_values(torch.zeros(4, 1, 48), spec)
    with pytest.raises(ValueError):  # keys come in whole groups of G tokens
        quantize_keys(torch.zeros(33, 1, 64), spec)
    with pytest.raises(ValueError, match="v_group_size"):  # Gv, not G, must divide D
        KVQuantSpec(4, 2, 32, 0, v_group_size=48).check_head_dim(64)
    KVQuantSpec(4, 2, 48, 0, v_group_size=16).check_head_dim(64)  # G itself need not divide D


def test_split_context():
    spec = KVQuantSpec(group_size=32, residual=40)
    for n in range(0, 300):
        nq, nw = split_context(spec, n)
        assert nq % 32 == 0 and nq + nw == n
        assert nw == n if n < 40 + 32 else 40 <= nw < 40 + 32
    # growing by one token never re-quantizes: the prefix only grows, by whole groups
    prev = 0
    for n in range(1, 300):
        nq = split_context(spec, n)[0]
        assert nq in (prev, prev + 32)
        prev = nq


@pytest.mark.parametrize("kb,vb,g,gv", [(4, 2, 32, None), (2, 2, 32, None), (8, 8, 64, None), (4, 4, 16, None),
                                         (2, 8, 8, None), (4, 2, 32, 64), (4, 2, 64, 16)])
def test_bytes_per_token_matches_tensors(kb, vb, g, gv):
    spec, h, d, n = KVQuantSpec(kb, vb, g, 0, v_group_size=gv), 3, 64, 4
    x = kv_data(n * g, h, d, 0)
    stored = sum(t.nbytes for t in (*quantize_keys(x, spec), *quantize_values(x, spec)))
    assert bytes_per_token(spec, 1, h, d) == stored / (n * g)
    assert bytes_per_token(spec, 30, h, d) == 30 * stored / (n * g)


def test_bytes_per_token_values():
    # K4V2 G32 D64, per head and layer: K 32 B codes + 2 fp16 x 64/32 = 8 B, V 16 + 8: 64 B (fp16: 256)
    spec = KVQuantSpec(4, 2, 32, 128)
    assert bytes_per_token(spec, 1, 1, 64) == 64.0
    assert bytes_per_token(KVQuantSpec(4, 4, 32, 0), 1, 1, 64) == 80.0
    # one value range per head (Gv = D = 64): V 16 + 4 = 20 B, so K4V2 costs 60 B (3.75 bits)
    assert bytes_per_token(KVQuantSpec(4, 2, 32, 0, v_group_size=64), 1, 1, 64) == 60.0
    # amortised window: ctx 4096 -> 3968 quantized + 128 fp16 tokens
    assert split_context(spec, 4096) == (3968, 128)
    want = (3968 * 64 + 128 * 256) / 4096
    assert bytes_per_token_at(spec, 1, 1, 64, 4096) == pytest.approx(want)
    assert bytes_per_token_at(spec, 1, 1, 64, 100) == 256.0  # all in the window


# ---------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_identity(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (5, 3, 64), generator=gen, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 3, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)
    assert torch.equal(unpack_float(packed, bits), codes.float())
    assert torch.equal(unpack_float(packed.transpose(0, 1), bits), codes.transpose(0, 1).float())
    every = torch.arange(256, dtype=torch.uint8)  # every byte value round-trips the other way
    assert torch.equal(pack(unpack(every[:, None], bits), bits), every[:, None])


def test_pack_layout_little_endian():
    assert pack(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    with pytest.raises(ValueError):
        pack(torch.zeros(3, dtype=torch.uint8), 4)


# ---------------------------------------------------------------- quantizer round trip

def test_known_answer():
    spec = KVQuantSpec(2, 2, 4, 0)
    k = torch.tensor([0.0, 1.0, 2.0, 3.0]).view(4, 1, 1).expand(4, 1, 4).contiguous()
    kq = quantize_keys(k, spec)
    assert kq.scale.tolist() == [[[1.0] * 4]] and kq.zero.tolist() == [[[0.0] * 4]]
    assert unpack(kq.codes, 2).view(4, 4)[:, 0].tolist() == [0, 1, 2, 3]
    vq = quantize_values(torch.tensor([[[-1.0, 0.0, 0.5, 2.0]]]), spec)  # per token: min -1, s 1
    assert vq.scale.tolist() == [[[1.0]]] and vq.zero.tolist() == [[[-1.0]]]
    assert unpack(vq.codes, 2).tolist() == [[[0, 1, 2, 3]]]  # 1.5 rounds half-to-even to 2


def _check_roundtrip(x, x_hat, scale, zero, bits):
    """x, x_hat [..., elements of a group]; scale/zero broadcast against them."""
    x, s, z = x.double(), scale.double(), zero.double()
    err = (x - x_hat.double()).abs()
    assert (err <= s * (0.5 + 2.0 ** (bits - 22))).all()
    assert (z <= x).all() and (z + s * ((1 << bits) - 1) >= x).all()  # clamping never bites
    assert err.max() > 0.3 * s.max()  # not vacuous: the bound is nearly reached


@pytest.mark.parametrize("bits", BITS)
def test_key_roundtrip_bound(bits):
    spec, g, h, d = KVQuantSpec(bits, 2, 32, 0), 32, 3, 64
    k = kv_data(5 * g, h, d, bits)
    k[:g, 0, 0] = 0.1  # a constant channel-group: scale 0 or tiny, still within bound
    kq = quantize_keys(k, spec)
    assert kq.codes.shape == (5, g, h, d * bits // 8) and kq.scale.shape == (5, h, d)
    assert kq.scale.dtype == kq.zero.dtype == torch.float16
    k_hat = dequantize_keys(kq, spec)
    _check_roundtrip(k.view(5, g, h, d), k_hat.view(5, g, h, d), kq.scale[:, None], kq.zero[:, None], bits)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gv", [None, 64, 8])
def test_value_roundtrip_bound(bits, gv):
    spec, h, d, t = KVQuantSpec(2, bits, 16, 0, v_group_size=gv), 2, 64, 37  # T needs no group multiple
    g = spec.value_group
    v = kv_data(t, h, d, 10 + bits)
    v[3] = 1.0  # constant tokens: exact
    vq = quantize_values(v, spec)
    assert vq.codes.shape == (t, h, d * bits // 8) and vq.scale.shape == (t, h, d // g)
    v_hat = dequantize_values(vq, spec)
    shape = (t, h, d // g, g)
    _check_roundtrip(v.view(shape), v_hat.view(shape), vq.scale[..., None], vq.zero[..., None], bits)
    assert torch.equal(v_hat[3], v[3])


@pytest.mark.parametrize("bits", BITS)
def test_roundtrip_bound_across_magnitudes(bits):
    """Groups spanning 1e-4 .. 1e4 (fp16 subnormal scales to large ones) keep the bound and
    the m <= x <= m + s(2^b - 1) invariant."""
    gen = torch.Generator().manual_seed(100 + bits)
    mag = 10.0 ** (torch.rand(512, 1, 1, generator=gen) * 8 - 4)
    x = torch.randn(512, 2, 64, generator=gen) * mag + torch.randn(512, 2, 1, generator=gen) * mag
    spec = KVQuantSpec(bits, bits, 16, 0)
    vq = quantize_values(x, spec)
    shape = (512, 2, 4, 16)
    _check_roundtrip(x.view(shape), dequantize_values(vq, spec).view(shape), vq.scale[..., None],
                     vq.zero[..., None], bits)
    kq = quantize_keys(x, spec)  # 32 groups of 16 tokens, magnitudes mixed within a group
    _check_roundtrip(x.view(32, 16, 2, 64), dequantize_keys(kq, spec).view(32, 16, 2, 64),
                     kq.scale[:, None], kq.zero[:, None], bits)


# ---------------------------------------------------------------- clipping

@pytest.mark.parametrize("bits", [2, 4])
def test_clipping_never_increases_group_error_and_helps_at_2_bits(bits):
    torch.manual_seed(3)
    v = torch.randn(512, 3, 64)
    v[:, :, 5] *= 5  # outlier channel
    errs = {}
    for clip in (False, True):
        spec = KVQuantSpec(4, bits, 32, 0, clip=clip)
        d = dequantize_values(quantize_values(v, spec), spec)
        errs[clip] = ((d - v) ** 2).view(512, 3, 2, 32).sum(-1)  # per value group
        kspec = KVQuantSpec(bits, 4, 32, 0, clip=clip)
        k = dequantize_keys(quantize_keys(v, kspec), kspec)
        errs[(clip, "k")] = ((k - v) ** 2).view(16, 32, 3, 64).sum(1)  # per key group (channel)
    assert bool((errs[True] <= errs[False] + 1e-6).all())
    assert torch.equal(errs[(True, "k")], errs[(False, "k")])  # keys are never clipped
    if bits == 2:
        assert errs[True].sum() < 0.8 * errs[False].sum()
