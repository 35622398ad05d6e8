"""KIVI quantized attention (kv_cache/quant_attention.py) against oracles.

- Quantized attention == dequantize (reference) + attention.decode_attention /
  prefill_attention on the concatenated [prefix, window] cache, fp32, <= 1e-4 abs:
  decode in gathered and pool (block table) form, prefix-only and window-only caches,
  bf16 window and query; prefill with and without prefix/window, row tiling, bf16.
- Hadamard rotation preserves scores, through the quantized path too.

The quantizer itself (spec, packing, round-trip bounds, clipping) is tested in
test_kivi_quantizer.py; the shared cases and cache builders are in tests/support/kivi.py.
"""

from __future__ import annotations

import pytest
import torch

from bastion.engine.attention import decode_attention, prefill_attention
from bastion.engine.kv_cache.quant import (
    KVQuantSpec, QuantKeys, QuantValues, dequantize_keys, dequantize_values, hadamard, quantize_keys,
    quantize_values, rotate,
)
from bastion.engine.kv_cache.quant_attention import (
    quantized_decode_attention, quantized_prefill_attention,
)

from tests.support.kivi import CASES, TOL, batch_caches, kv_data, one_thread, to_pool  # noqa: F401  (autouse fixture)


# ---------------------------------------------------------------- decode attention oracle


@pytest.mark.parametrize("kb,vb,g,r,lens,gq", CASES)
def test_decode_matches_dequantized_oracle(kb, vb, g, r, lens, gq):
    spec, h, d = KVQuantSpec(kb, vb, g, r), 3, 64
    kq, vq, k_fp, v_fp, bm, wm, ko, vo, mask = batch_caches(spec, lens, h, d, seed=kb * 10 + vb)
    q = torch.randn(len(lens), h * gq, d, generator=torch.Generator().manual_seed(1)) * 2
    ref = decode_attention(q, ko, vo, mask, d ** -0.5)
    out = quantized_decode_attention(q, kq, vq, k_fp, v_fp, spec, block_mask=bm, window_mask=wm)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out - ref).abs().max() <= TOL
    small = quantized_decode_attention(q, kq, vq, k_fp, v_fp, spec, block_mask=bm, window_mask=wm,
                                       chunk_blocks=3)  # chunking changes nothing
    assert (small - ref).abs().max() <= TOL


@pytest.mark.parametrize("g,gv,lens,gq", [(32, 64, [200, 161, 256, 130], 3), (16, 32, [100, 17, 64], 2),
                                           (64, 16, [300, 129], 3), (8, 4, [40, 9], 40)])
def test_decode_with_value_group_apart_matches_oracle(g, gv, lens, gq):
    """Gv != G: value ranges over Gv channels, key groups and blocks of G tokens (gq = 40 > G
    takes the unfolded tile path)."""
    spec, h, d = KVQuantSpec(4, 2, g, 16, v_group_size=gv), 3, 64
    kq, vq, k_fp, v_fp, bm, wm, ko, vo, mask = batch_caches(spec, lens, h, d, seed=g + gv)
    assert vq.scale.shape[-1] == d // gv
    q = torch.randn(len(lens), h * gq, d, generator=torch.Generator().manual_seed(1)) * 2
    ref = decode_attention(q, ko, vo, mask, d ** -0.5)
    out = quantized_decode_attention(q, kq, vq, k_fp, v_fp, spec, block_mask=bm, window_mask=wm)
    assert (out - ref).abs().max() <= TOL


def test_decode_prefix_only_and_window_only():
    spec, h, d, gq = KVQuantSpec(4, 2, 16, 0), 2, 32, 3
    kq, vq, _, _, bm, _, ko, vo, mask = batch_caches(spec, [64, 32, 48], h, d, seed=3)
    q = torch.randn(3, h * gq, d)
    ref = decode_attention(q, ko, vo, mask, d ** -0.5)
    out = quantized_decode_attention(q, kq, vq, None, None, spec, block_mask=bm)  # no window at all
    assert (out - ref).abs().max() <= TOL
    spec = KVQuantSpec(4, 2, 16, 100)  # every sequence shorter than R: window only
    kq, vq, k_fp, v_fp, bm, wm, ko, vo, mask = batch_caches(spec, [64, 3, 99], h, d, seed=4)
    assert kq.codes.shape[1] == 0
    ref = decode_attention(q, ko, vo, mask, d ** -0.5)
    for k_arg, v_arg in ((kq, vq), (None, None)):
        out = quantized_decode_attention(q, k_arg, v_arg, k_fp, v_fp, spec, window_mask=wm)
        assert (out - ref).abs().max() <= TOL
    with pytest.raises(ValueError):
        quantized_decode_attention(q, None, None, None, None, spec)
    kq, vq, *_ = batch_caches(KVQuantSpec(4, 2, 16, 0), [32], h, d, seed=4)
    with pytest.raises(ValueError):  # codes packed at other bit widths than the spec says
        quantized_decode_attention(q[:1], kq, vq, None, None, KVQuantSpec(2, 4, 16, 0))


def test_decode_pool_form_with_block_table():
    """Blocks living in a pool ([N, G, ...]) in shuffled order, padding pointing at block 0."""
    spec, h, d, gq = KVQuantSpec(4, 2, 32, 32), 3, 64, 3
    kq, vq, k_fp, v_fp, bm, wm, ko, vo, mask = batch_caches(spec, [300, 100, 70], h, d, seed=5)
    pool_k, pool_v, table = to_pool(kq, vq, bm)
    q = torch.randn(bm.shape[0], h * gq, d)
    ref = decode_attention(q, ko, vo, mask, d ** -0.5)
    out = quantized_decode_attention(q, pool_k, pool_v, k_fp, v_fp, spec,
                                     block_mask=bm, window_mask=wm, block_table=table, chunk_blocks=2)
    assert (out - ref).abs().max() <= TOL


def test_decode_bf16_window_and_query():
    spec, h, d, gq = KVQuantSpec(4, 4, 32, 64), 3, 64, 3
    kq, vq, k_fp, v_fp, bm, wm, ko, vo, mask = batch_caches(spec, [400, 90], h, d, seed=6, dtype=torch.bfloat16)
    q = torch.randn(2, h * gq, d).bfloat16()
    out = quantized_decode_attention(q, kq, vq, k_fp, v_fp, spec, block_mask=bm, window_mask=wm)
    ref = decode_attention(q.float(), ko, vo, mask, d ** -0.5)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 2 ** -7 * ref.abs().max() + TOL  # bf16 output rounding


# ---------------------------------------------------------------- prefill oracle

def _prefix_and_window(spec, nq, w, h, d):
    """Context of nq quantized + w fp tokens: (k, v [nq + w, h, d] as written, the prefix's
    QuantKeys/QuantValues, oracle k, v = dequantized prefix + fp window)."""
    k, v = kv_data(nq + w, h, d, 7, outlier=4.0), kv_data(nq + w, h, d, 8, outlier=0)
    kq, vq = quantize_keys(k[:nq], spec), quantize_values(v[:nq], spec)
    ko = torch.cat([dequantize_keys(kq, spec), k[nq:]])
    vo = torch.cat([dequantize_values(vq, spec), v[nq:]])
    return k, v, kq, vq, ko, vo


@pytest.mark.parametrize("kb,vb,g,n_blocks,w,q_len,q_chunk", [
    (4, 2, 32, 3, 40, 40, None),  # the whole window is this step's chunk
    (4, 2, 32, 3, 40, 17, None),  # window holds older fp tokens too
    (4, 2, 32, 3, 40, 17, 1),  # 1 row per tile: M = 3 <= G takes the decode (folded) path
    (2, 2, 16, 4, 10, 50, 7),  # q_len > w: early queries sit inside the quantized prefix
    (8, 4, 16, 2, 0, 20, 6),  # no window
    (4, 8, 16, 0, 25, 25, 4),  # no prefix
    (4, 2, 32, 8, 144, 300, None),  # long chunk: default row tiling (2 tiles)
])
def test_prefill_matches_dequantized_oracle(kb, vb, g, n_blocks, w, q_len, q_chunk):
    spec, h, d, gq = KVQuantSpec(kb, vb, g, 0), 3, 64, 3
    nq = n_blocks * g
    k, v, kq, vq, ko, vo = _prefix_and_window(spec, nq, w, h, d)
    q = torch.randn(q_len, h * gq, d, generator=torch.Generator().manual_seed(2))
    ref = prefill_attention(q, ko, vo, d ** -0.5)
    args = (kq, vq) if n_blocks else (None, None)
    fp = (k[nq:], v[nq:]) if w else (None, None)
    out = quantized_prefill_attention(q, *args, *fp, spec, q_chunk=q_chunk)
    assert out.shape == q.shape and (out - ref).abs().max() <= TOL
    if n_blocks:  # pool form: blocks at reversed positions of a bigger pool
        table = torch.arange(n_blocks) * 2 + 1
        pk = [torch.zeros(2 * n_blocks + 1, *t.shape[1:], dtype=t.dtype) for t in kq]
        pv = [torch.zeros(2 * n_blocks + 1, g, *t.shape[1:], dtype=t.dtype) for t in vq]
        for p, t in zip(pk, kq):
            p[table] = t
        for p, t in zip(pv, vq):
            p[table] = t.view(n_blocks, g, *t.shape[1:])
        out = quantized_prefill_attention(q, QuantKeys(*pk), QuantValues(*pv), *fp, spec, block_table=table)
        assert (out - ref).abs().max() <= TOL


@pytest.mark.parametrize("q_len,q_chunk", [(40, None), (300, None), (300, 1)])
def test_prefill_bf16_is_no_worse_than_the_fp_cache_in_bf16(q_len, q_chunk):
    """A bf16 model's prompt chunk runs the many-row products in bf16 (scores and softmax
    in fp32). Bound: its error vs the fp32 oracle stays within 2x the error of the fp
    cache's own bf16 prefill on the same dequantized K/V (plus TOL) -- the precision the
    served model already has, not a looser one."""
    spec, h, d, gq, g = KVQuantSpec(4, 2, 32, 0), 3, 64, 3, 32
    nq, w = 8 * g, 144
    k, v, kq, vq, ko, vo = _prefix_and_window(spec, nq, w, h, d)
    q = torch.randn(q_len, h * gq, d, generator=torch.Generator().manual_seed(2))
    ref = prefill_attention(q, ko, vo, d ** -0.5)
    fp_bf16 = prefill_attention(q.bfloat16(), ko.bfloat16(), vo.bfloat16(), d ** -0.5).float()
    out = quantized_prefill_attention(q.bfloat16(), kq, vq, k[nq:].bfloat16(), v[nq:].bfloat16(), spec,
                                      q_chunk=q_chunk)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 2 * (fp_bf16 - ref).abs().max() + TOL


# ---------------------------------------------------------------- Hadamard rotation

def test_hadamard_rotation_preserves_scores():
    hm = hadamard(64)
    assert torch.allclose(hm @ hm.T, torch.eye(64), atol=1e-6) and torch.equal(hm, hm.T)
    q, k = torch.randn(5, 64), torch.randn(7, 64)
    assert torch.allclose(rotate(q, hm) @ rotate(k, hm).T, q @ k.T, atol=1e-4)
    with pytest.raises(ValueError):
        hadamard(48)
    # rotated keys through the quantized path == rotated q against the dequantized keys
    spec, h, d = KVQuantSpec(4, 4, 16, 0), 2, 64
    kr = rotate(kv_data(32, h, d, 9, outlier=4.0), hm)
    v = kv_data(32, h, d, 10, outlier=0)
    kq, vq = quantize_keys(kr, spec), quantize_values(v, spec)
    qr = rotate(torch.randn(1, h * 2, d), hm)
    ref = decode_attention(qr, dequantize_keys(kq, spec)[None], dequantize_values(vq, spec)[None],
                           torch.ones(1, 32, dtype=torch.bool), d ** -0.5)
    vqb = QuantValues(*(t.view(1, 2, 16, *t.shape[1:]) for t in vq))
    out = quantized_decode_attention(qr, QuantKeys(*(t[None] for t in kq)), vqb, None, None, spec)
    assert (out - ref).abs().max() <= TOL
