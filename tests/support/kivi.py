"""KIVI test helpers: synthetic key/value data, per-sequence quantized caches and their
pool form, a driver of the model runner's step planning over a cache, and the one-thread
autouse fixture (import it into a test module to apply it there)."""

from __future__ import annotations

import pytest
import torch

from bastion.engine.kv_cache.block_manager import BlockManager
from bastion.engine.kv_cache.quant import (
    QuantKeys,
    QuantValues,
    dequantize_keys,
    dequantize_values,
    quantize_keys,
    quantize_values,
    split_context,
)
from bastion.engine.kv_cache.quant_attention import lengths_to_mask
from bastion.engine.model_runner import ModelRunner
from bastion.engine.request import Request
from bastion.engine.sampling_params import SamplingParams
from bastion.engine.scheduler import ScheduledBatch


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def kv_data(t, h, d, seed, outlier=20.0):
    """Key-like data [t, h, d]: gaussian, a few channels `outlier`x larger, per-channel
    offsets (outlier=0: plain gaussian, value-like)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, d, generator=gen)
    if outlier:
        x[:, :, :: max(1, d // 4)] *= outlier
        x += torch.randn(1, h, d, generator=gen) * 3.0
    return x


TOL = 1e-4


def batch_caches(spec, ctx_lens, h, d, seed, dtype=torch.float32):
    """Per-sequence caches split by split_context, gathered and padded.
    Returns (kq, vq, k_fp, v_fp, block_mask, window_mask, oracle k, v [B, ctx, h, d], mask)."""
    g = spec.group_size
    splits = [split_context(spec, n) for n in ctx_lens]
    nb = max(s[0] for s in splits) // g
    w = max(s[1] for s in splits)
    b = len(ctx_lens)
    kc = torch.zeros(b, nb, g, h, d * spec.k_bits // 8, dtype=torch.uint8)
    ks = torch.zeros(b, nb, h, d, dtype=torch.float16)
    kz = torch.zeros_like(ks)
    vc = torch.zeros(b, nb, g, h, d * spec.v_bits // 8, dtype=torch.uint8)
    vs = torch.zeros(b, nb, g, h, d // spec.value_group, dtype=torch.float16)
    vz = torch.zeros_like(vs)
    k_fp = torch.zeros(b, w, h, d, dtype=dtype)
    v_fp = torch.zeros_like(k_fp)
    ko = torch.zeros(b, nb * g + w, h, d)
    vo = torch.zeros_like(ko)
    mask = torch.zeros(b, nb * g + w, dtype=torch.bool)
    for i, ((nq, nw), n) in enumerate(zip(splits, ctx_lens)):
        k, v = kv_data(n, h, d, seed + 2 * i, outlier=4.0), kv_data(n, h, d, seed + 2 * i + 1, outlier=0)
        kq, vq = quantize_keys(k[:nq], spec), quantize_values(v[:nq], spec)
        m = nq // g
        kc[i, :m], ks[i, :m], kz[i, :m] = kq
        vc[i, :m], vs[i, :m], vz[i, :m] = (t.view(m, g, *t.shape[1:]) for t in vq)
        k_fp[i, :nw], v_fp[i, :nw] = k[nq:].to(dtype), v[nq:].to(dtype)
        ko[i, :nq], vo[i, :nq] = dequantize_keys(kq, spec), dequantize_values(vq, spec)
        ko[i, nb * g : nb * g + nw], vo[i, nb * g : nb * g + nw] = k_fp[i, :nw].float(), v_fp[i, :nw].float()
        mask[i, :nq] = True
        mask[i, nb * g : nb * g + nw] = True
    block_mask = lengths_to_mask(torch.tensor([s[0] // g for s in splits]), nb)
    window_mask = lengths_to_mask(torch.tensor([s[1] for s in splits]), w)
    return (QuantKeys(kc, ks, kz), QuantValues(vc, vs, vz), k_fp, v_fp, block_mask, window_mask, ko, vo, mask)


CASES = [  # (k_bits, v_bits, G, R, context lengths, q heads per kv head)
    (4, 2, 32, 128, [200, 161, 4096 // 16, 130], 3),
    (2, 2, 32, 0, [64, 33, 95, 1], 3),  # R=0: window empty when len % G == 0
    (8, 8, 16, 16, [17, 48, 100, 5], 1),
    (4, 4, 8, 20, [27, 28, 29, 211], 2),
    (2, 8, 16, 8, [300, 31, 24, 40], 4),
    (8, 2, 64, 64, [500, 128, 129, 60], 3),
]


def to_pool(kq, vq, bm):
    """Gathered [B, nb, ...] blocks -> a pool [1 + B*nb, ...] in shuffled order, and the
    block table [B, nb] (padding entries point at block 0, which holds zeros)."""
    b, nb = bm.shape
    n_pool = 1 + b * nb
    perm = torch.randperm(n_pool - 1, generator=torch.Generator().manual_seed(0)) + 1
    table = perm.view(b, nb).masked_fill(~bm, 0)
    pool_k = [torch.zeros(n_pool, *t.shape[2:], dtype=t.dtype) for t in kq]
    pool_v = [torch.zeros(n_pool, *t.shape[2:], dtype=t.dtype) for t in vq]
    for p, t in zip(pool_k + pool_v, list(kq) + list(vq)):
        p[table[bm]] = t[bm]
    return QuantKeys(*pool_k), QuantValues(*pool_v), table


def drive(cache, schedule, slots=4):
    """Runs `schedule` ({"seqs": name -> total tokens, "steps": [[(name, tokens), ...]]})
    through a block manager and the model runner's step planning over `cache`. Returns
    (block manager, requests by name, steps): `steps` yields (items in prepared row order,
    rows, meta) per step and advances each request's computed tokens once the caller has
    written and attended that step."""
    bm = BlockManager(cache.num_blocks, cache.block_size, False, num_seq_slots=slots, blocks_for=cache.blocks_for)
    runner = ModelRunner(None, cache, torch.device("cpu"))
    reqs = {name: Request(name, [1] * total, SamplingParams(max_tokens=1)) for name, total in schedule["seqs"].items()}

    def steps():
        for step in schedule["steps"]:
            items = [(reqs[name], n) for name, n in step]
            for req, n in items:
                assert bm.allocate(req, n)
            order, _, pos, meta = runner.prepare(ScheduledBatch(items))
            yield order, pos.shape[0], meta
            for req, n in items:
                req.num_computed_tokens += n

    return bm, reqs, steps()
