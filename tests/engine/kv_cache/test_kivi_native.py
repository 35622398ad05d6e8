"""The fused native KIVI decode kernel (csrc/kivi_decode.cpp) against two oracles: the
attention over the explicitly dequantized cache, and the torch-ops path it replaces.

The build is part of the test: on the CI machine (gcc + ninja, both dependencies of the
install) `load_kernel("native", 64)` must succeed, so a kernel that stops compiling fails
here instead of silently falling back to the torch path."""

from __future__ import annotations

import pytest
import torch

from bastion.config import CacheConfig
from bastion.engine.attention import decode_attention
from bastion.engine.kv_cache.kivi import KIVIKVCache
from bastion.engine.kv_cache.native import load_kernel
from bastion.engine.kv_cache.quant import KVQuantSpec
from bastion.engine.kv_cache.quant_attention import quantized_decode_attention

from tests.support.kivi import CASES, TOL, batch_caches, drive, to_pool


@pytest.fixture(scope="module")
def kernel():
    return load_kernel("native", 64)


def _both(q, kq, vq, k_fp, v_fp, spec, kernel, **kw):
    nat = quantized_decode_attention(q, kq, vq, k_fp, v_fp, spec, kernel=kernel, **kw)
    ref = quantized_decode_attention(q, kq, vq, k_fp, v_fp, spec, **kw)
    return nat, ref


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kb,vb,g,r,lens,gq", CASES)
def test_native_matches_dequantized_oracle(kernel, kb, vb, g, r, lens, gq, threads):
    n = torch.get_num_threads()
    torch.set_num_threads(threads)  # 2 threads: the context is split and the splits merged
    try:
        spec, h, d = KVQuantSpec(kb, vb, g, r), 3, 64
        kq, vq, k_fp, v_fp, bm, wm, ko, vo, mask = batch_caches(spec, lens, h, d, seed=kb * 10 + vb)
        q = torch.randn(len(lens), h * gq, d, generator=torch.Generator().manual_seed(1)) * 2
        oracle = decode_attention(q, ko, vo, mask, d ** -0.5)
        nat, ref = _both(q, kq, vq, k_fp, v_fp, spec, kernel, block_mask=bm, window_mask=wm)
        assert nat.shape == q.shape and nat.dtype == q.dtype
        assert (nat - oracle).abs().max() <= TOL
        assert (nat - ref).abs().max() <= 1e-5
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("g,gv,d,gq", [(32, 64, 64, 3), (16, 32, 128, 4), (8, 4, 64, 1), (32, 16, 128, 8)])
def test_native_value_groups_and_head_dims(kernel, g, gv, d, gq):
    """Value groups apart from G (one range per head at Gv = D), head_dim 128, M = 1..8."""
    spec, h = KVQuantSpec(4, 2, g, 16, v_group_size=gv), 2
    kq, vq, k_fp, v_fp, bm, wm, ko, vo, mask = batch_caches(spec, [200, 17, 96], h, d, seed=g + gv + d)
    q = torch.randn(3, h * gq, d, generator=torch.Generator().manual_seed(2))
    oracle = decode_attention(q, ko, vo, mask, d ** -0.5)
    nat, ref = _both(q, kq, vq, k_fp, v_fp, spec, kernel, block_mask=bm, window_mask=wm)
    assert (nat - oracle).abs().max() <= TOL
    assert (nat - ref).abs().max() <= 1e-5


def test_native_pool_form_masks_and_no_window(kernel):
    """Shuffled pool blocks with padding pointing at block 0, a masked-out block in the
    middle of a row, and no fp window at all."""
    spec, h, d, gq = KVQuantSpec(4, 2, 32, 0), 3, 64, 3
    kq, vq, _, _, bm, _, ko, vo, mask = batch_caches(spec, [320, 64, 160], h, d, seed=7)
    pool_k, pool_v, table = to_pool(kq, vq, bm)
    b = bm.shape[0]
    bm = bm.clone()
    bm[0, 3] = False  # a hole: its tokens get weight exactly 0
    mask[0, 3 * 32 : 4 * 32] = False
    q = torch.randn(b, h * gq, d)
    oracle = decode_attention(q, ko, vo, mask, d ** -0.5)
    nat, ref = _both(q, pool_k, pool_v, None, None, spec, kernel,
                     block_mask=bm, block_table=table)
    assert (nat - oracle).abs().max() <= TOL
    assert (nat - ref).abs().max() <= 1e-5


def test_native_bf16_window_and_query(kernel):
    spec, h, d, gq = KVQuantSpec(4, 2, 32, 64), 3, 64, 3
    kq, vq, k_fp, v_fp, bm, wm, ko, vo, mask = batch_caches(spec, [400, 90], h, d, seed=6, dtype=torch.bfloat16)
    q = torch.randn(2, h * gq, d).bfloat16()
    nat, ref = _both(q, kq, vq, k_fp, v_fp, spec, kernel, block_mask=bm, window_mask=wm)
    assert nat.dtype == torch.bfloat16
    assert (nat.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()


def test_native_rejects_codes_of_other_widths(kernel):
    spec, h, d = KVQuantSpec(4, 2, 16, 0), 2, 64
    kq, vq, *_ = batch_caches(spec, [32], h, d, seed=4)
    q = torch.randn(1, h * 3, d)
    with pytest.raises(ValueError, match="packed codes"):  # codes packed at other widths than the spec says
        quantized_decode_attention(q, kq, vq, None, None, KVQuantSpec(2, 4, 16, 0), kernel=kernel)


def test_kernel_choice_validation():
    assert load_kernel("torch", 64) is None
    assert load_kernel("auto", 96) is None  # no instantiation for 96: torch path
    with pytest.raises(ValueError, match="head_dim"):
        load_kernel("native", 96)
    with pytest.raises(ValueError, match="kv kernel"):
        load_kernel("fast", 64)
    with pytest.raises(ValueError, match="kv_kernel"):
        CacheConfig(kind="kivi", kv_kernel="fast")


def test_native_inside_the_pool_matches_torch_path():
    """The same schedule (uneven prompt chunks, then decodes of two sequences, groups
    crossing the frontier, sink, Hadamard) through two pools, native vs torch kernel:
    every decode output equal to fp32 tolerance (prompt chunks take the torch path in both)."""
    h, heads, d, g = 3, 9, 64, 8
    spec = KVQuantSpec(4, 2, g, 8)
    caches = {k: KIVIKVCache(num_layers=1, num_kv_heads=h, head_dim=d, num_blocks=64, spec=spec, num_seq_slots=2,
                             sink=8, use_hadamard=True, fp_dtype=torch.float32, kernel=k) for k in ("torch", "native")}
    assert caches["native"].kernel is not None and caches["torch"].kernel is None
    gen = torch.Generator().manual_seed(0)
    schedule = {"seqs": {"a": 200, "b": 60},
                "steps": [[("a", n)] for n in (37, 1, 9, 3)] + [[("a", 1), ("b", 11)]] + [[("a", 1), ("b", 1)]] * 40}
    decodes = 0
    for _, t, meta in drive(caches["torch"], schedule, slots=2)[2]:
        k, v = torch.randn(t, h, d, generator=gen), torch.randn(t, h, d, generator=gen)
        q = torch.randn(t, heads, d, generator=gen)
        outs = {}
        for name, cache in caches.items():
            cache.begin_step(meta)
            cache.write(0, k, v, meta)
            outs[name] = cache.attend(0, q, meta)
        assert (outs["native"] - outs["torch"]).abs().max() <= 1e-5
        decodes += meta.num_decodes
    assert decodes > 60


def test_cli_flag_reaches_the_cache():
    """`--kv-kernel` goes CLI -> CacheConfig -> factory -> the cache's kernel."""
    from bastion.cli import _config, build_parser
    from bastion.config import Config, SchedulerConfig
    from bastion.engine.kv_cache.factory import build_kv_cache
    from bastion.engine.models.arch import ModelArch

    from tests.support.engines import tiny_llama_config

    arch = ModelArch.from_hf_config(tiny_llama_config(num_hidden_layers=2, hidden_size=256, num_attention_heads=4,
                                                      num_key_value_heads=2))  # head_dim 64
    for flag, native in (("torch", False), ("native", True), ("auto", True)):
        args = build_parser().parse_args(["serve", "--kv-cache", "kivi", "--kv-kernel", flag, "--kv-memory", "0.01"])
        cc = _config(args).cache
        assert cc.kv_kernel == flag
        cache = build_kv_cache(Config(cache=cc, scheduler=SchedulerConfig(max_num_seqs=2)), arch, torch.bfloat16,
                               torch.device("cpu"))
        assert (cache.kernel is not None) == native
