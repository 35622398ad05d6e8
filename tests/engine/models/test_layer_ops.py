"""The fused layer ops (csrc/decode_ops.cpp) against their torch oracle (layer_ops.py's
fallbacks), and the model with them against the model without."""

from __future__ import annotations

import pytest
import torch

from bastion.engine.models.layer_ops import LayerOps
from bastion.engine.models.quant_linear import load_qkernel

from tests.support.engines import decode_one_by_one, tiny_model


@pytest.fixture(scope="module")
def ops():
    kernel = load_qkernel()
    if kernel is None:
        pytest.skip("no C++ compiler: the native kernels did not build (torch ops serve)")
    return LayerOps(kernel), LayerOps(None)


@pytest.mark.parametrize("t", [1, 3, 17])
def test_norms_match_torch(ops, t):
    native, ref = ops
    torch.manual_seed(t)
    x, d, w = torch.randn(t, 576) * 3, torch.randn(t, 576), torch.rand(576) + 0.5
    assert torch.allclose(native.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-5)
    x1, x2 = x.clone(), x.clone()
    h1, h2 = native.add_rms_norm_(x1, d, w, 1e-5), ref.add_rms_norm_(x2, d, w, 1e-5)
    assert torch.equal(x1, x2) and torch.equal(x1, x + d)  # the residual stream, updated in place
    assert torch.allclose(h1, h2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (4, 4, 128), (2, 1, 16)])
def test_rope_matches_torch(ops, heads, kv_heads, d):
    native, ref = ops
    torch.manual_seed(d)
    t = 5
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d)
    ang = torch.rand(t, d // 2) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    q1, k1, v1 = native.rope_qk(qkv.clone(), cos, sin, heads, kv_heads, d)
    q2, k2, v2 = ref.rope_qk(qkv.clone(), cos, sin, heads, kv_heads, d)
    for a, b in ((q1, q2), (k1, k2), (v1, v2)):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t,i", [(1, 1536), (3, 37), (17, 256), (256, 2048)])
def test_silu_mul_matches_a_float64_oracle(ops, t, i):
    """The native exp (AVX-512 polynomial, scalar tail) within a few ulps of float64's, at
    every lane position, at the saturating ends and at any row count (threads split rows)."""
    native, ref = ops
    gu = torch.randn(t, 2 * i, generator=torch.Generator().manual_seed(i)) * 8
    gu[0, :6] = torch.tensor([-100.0, 100.0, 0.0, -87.5, 88.5, -1e-30])
    want = torch.nn.functional.silu(gu[:, :i].double()) * gu[:, i:].double()
    for got in (native.silu_mul(gu), ref.silu_mul(gu)):
        assert got.shape == (t, i) and torch.isfinite(got).all()
        assert ((got.double() - want).abs() <= 1e-6 * want.abs() + 1e-30).all(), float((got.double() - want).abs().max())


def test_bf16_rows_take_the_torch_ops(ops):
    native, ref = ops
    x, w = torch.randn(2, 64, dtype=torch.bfloat16), torch.ones(64, dtype=torch.bfloat16)
    assert torch.equal(native.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5))


def test_tiny_model_with_native_ops_equals_torch_ops(ops):
    native, _ = ops
    model = tiny_model(seed=3)
    ids = list(range(5, 40))
    ref = decode_one_by_one(model, ids)
    model.ops = native
    try:
        ours = decode_one_by_one(model, ids)
    finally:
        model.ops = LayerOps()
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4), float((ours - ref).abs().max())
