"""The KIVI paged pool (engine/kv_cache/kivi.py) against an independent oracle.

Oracle: every position's fp K/V as written; at a step, positions in [S, nq0) (quantized
before the step) are replaced by quantize -> dequantize of their whole G-group (in the
rotated space when Hadamard is on), everything else is fp; then plain causal attention in
fp64. The pool must match it to float tolerance over mixed decode + prompt-chunk steps,
lengths not divisible by G or R, chunks longer and shorter than the window, sinks.
"""

from __future__ import annotations

import random

import pytest
import torch

from bastion.engine.kv_cache.block_manager import BlockManager
from bastion.engine.kv_cache.kivi import KIVIKVCache
from bastion.engine.kv_cache.quant import (
    KVQuantSpec, dequantize_keys, dequantize_values, hadamard, quantize_keys, quantize_values, split_context,
)
from bastion.engine.model_runner import ModelRunner
from bastion.engine.request import Request
from bastion.engine.sampling_params import SamplingParams
from bastion.engine.scheduler import ScheduledBatch
from tests.support.kivi import drive

H, HEADS, D = 2, 4, 16


def _oracle_kv(hist_k, hist_v, spec, sink, nq0, rot):
    """fp64 K/V of one sequence's context as the cache should see it."""
    k, v = hist_k.clone().double(), hist_v.clone().double()
    g = spec.group_size
    for p0 in range(sink, nq0, g):
        kg, vg = hist_k[p0 : p0 + g].float(), hist_v[p0 : p0 + g].float()
        if rot is not None:
            kg, vg = kg @ rot, vg @ rot
        kd = dequantize_keys(quantize_keys(kg, spec), spec)
        vd = dequantize_values(quantize_values(vg, spec), spec)
        if rot is not None:
            kd, vd = kd @ rot, vd @ rot
        k[p0 : p0 + g], v[p0 : p0 + g] = kd.double(), vd.double()
    return k, v


def _oracle_attn(q, k, v):
    """q [heads, D], k/v [ctx, H, D] fp64 -> [heads, D]."""
    kk = k.repeat_interleave(HEADS // H, dim=1)  # [ctx, heads, D]
    s = torch.einsum("hd,thd->ht", q.double(), kk) * D ** -0.5
    return torch.einsum("ht,thd->hd", torch.softmax(s, -1), v.repeat_interleave(HEADS // H, dim=1))


def _run(spec, sink, use_rot, schedule, seed=0, layers=1):
    torch.manual_seed(seed)
    cache = KIVIKVCache(num_layers=layers, num_kv_heads=H, head_dim=D, num_blocks=64, spec=spec,
                        num_seq_slots=4, sink=sink, use_hadamard=use_rot, fp_dtype=torch.float32)
    rot = hadamard(D) if use_rot else None
    bm, reqs, steps = drive(cache, schedule)
    hist = {name: (torch.empty(0, H, D), torch.empty(0, H, D)) for name in reqs}
    worst = 0.0
    for order, t, meta in steps:
        k, v, q = torch.randn(t, H, D), torch.randn(t, H, D), torch.randn(t, HEADS, D)
        k[:, 0] *= 8  # an outlier channel, as real keys have
        for layer in range(layers):
            cache.write(layer, k, v, meta)
            out = cache.attend(layer, q, meta)
        row = 0
        for it in order:
            req, n = it.req, it.n
            c0 = req.num_computed_tokens
            hk, hv = hist[req.request_id]
            hk, hv = torch.cat([hk, k[row : row + n]]), torch.cat([hv, v[row : row + n]])
            hist[req.request_id] = (hk, hv)
            nq0 = split_context(spec, c0)[0]
            ok, ov = _oracle_kv(hk, hv, spec, sink, nq0, rot)
            for i in range(n):
                want = _oracle_attn(q[row + i], ok[: c0 + i + 1], ov[: c0 + i + 1])
                err = (out[row + i].double() - want).abs().max().item() / want.abs().max().item()
                worst = max(worst, err)
            row += n
    return worst, cache, bm, reqs


def _schedule(g, r, seed=0):
    """Two sequences: a long prompt in uneven chunks then decodes, and a short one joining late."""
    rnd = random.Random(seed)
    a_prompt, b_prompt = 3 * (r + g) + 5, g + 3
    steps, done_a = [], 0
    while done_a < a_prompt:
        n = min(rnd.choice([1, 3, g + 1, r + g + 7]), a_prompt - done_a)
        steps.append([("a", n)])
        done_a += n
    steps.append([("a", 1), ("b", b_prompt)])
    for _ in range(2 * g + r // 2 + 3):
        steps.append([("a", 1), ("b", 1)])
    total_a = a_prompt + 1 + 2 * g + r // 2 + 3
    return {"seqs": {"a": total_a, "b": b_prompt + 2 * g + r // 2 + 3}, "steps": steps}


@pytest.mark.parametrize("kb,vb", [(4, 2), (2, 4), (8, 8), (2, 2)])
@pytest.mark.parametrize("g,r,sink,rot", [(8, 8, 0, False), (8, 12, 8, False), (4, 0, 0, True), (8, 16, 16, True)])
def test_pool_matches_dequantized_oracle(kb, vb, g, r, sink, rot):
    spec = KVQuantSpec(kb, vb, g, r)
    worst, *_ = _run(spec, sink, rot, _schedule(g, r))
    assert worst < 2e-5


def test_nothing_is_requantized():
    """A block's codes, once written, never change while its sequence lives."""
    spec = KVQuantSpec(4, 2, 8, 8)
    sched = _schedule(8, 8, seed=1)
    cut = len(sched["steps"]) // 2
    _, cache, bm, reqs = _run(spec, 0, False, {"seqs": sched["seqs"], "steps": sched["steps"][:cut]})
    a = reqs["a"]
    nq = split_context(spec, a.num_computed_tokens)[0] // 8
    assert nq >= 2
    before = cache.k_codes[0, a.tracks[0].block_ids[:nq]].clone(), cache.v_scale[0, a.tracks[0].block_ids[:nq]].clone()
    runner = ModelRunner(None, cache, torch.device("cpu"))
    for _ in range(20):  # more decodes move the frontier on
        assert bm.allocate(a, 1)
        _, _, _, meta = runner.prepare(ScheduledBatch([(a, 1)]))
        cache.write(0, torch.randn(1, H, D), torch.randn(1, H, D), meta)
        a.num_computed_tokens += 1
    assert split_context(spec, a.num_computed_tokens)[0] // 8 > nq
    assert torch.equal(cache.k_codes[0, a.tracks[0].block_ids[:nq]], before[0])
    assert torch.equal(cache.v_scale[0, a.tracks[0].block_ids[:nq]], before[1])


def test_seq_slots_and_blocks_come_back():
    spec = KVQuantSpec(4, 2, 8, 8)
    _, cache, bm, reqs = _run(spec, 8, False, _schedule(8, 8))
    assert bm.num_used_blocks > 0 and len(bm.free_seq_slots) == 2
    for r in reqs.values():
        bm.free_request(r)
    assert bm.num_used_blocks == 0 and sorted(bm.free_seq_slots) == [0, 1, 2, 3]
    assert all(r.tracks[0].seq_slot == -1 for r in reqs.values())


def test_block_manager_refuses_when_seq_slots_run_out():
    bm = BlockManager(16, 8, False, num_seq_slots=1)
    a, b = (Request(n, [1] * 10, SamplingParams(max_tokens=1)) for n in "ab")
    assert bm.allocate(a, 10)
    assert not bm.allocate(b, 10) and b.tracks[0].block_ids == [] and b.tracks[0].seq_slot == -1
    bm.free_request(a)
    assert bm.allocate(b, 10)


def test_bad_pool_options():
    with pytest.raises(ValueError, match="sink"):
        KIVIKVCache(num_layers=1, num_kv_heads=H, head_dim=D, num_blocks=4, spec=KVQuantSpec(4, 2, 8, 8),
                    num_seq_slots=1, sink=4)
    with pytest.raises(ValueError, match="group_size"):
        KIVIKVCache(num_layers=1, num_kv_heads=H, head_dim=12, num_blocks=4, spec=KVQuantSpec(4, 2, 8, 8),
                    num_seq_slots=1)


@pytest.mark.parametrize("gv", [4, 16])
def test_pool_with_value_group_apart_matches_its_oracle(gv):
    spec = KVQuantSpec(4, 2, 8, 8, v_group_size=gv)
    worst, cache, *_ = _run(spec, 8, True, _schedule(8, 8, seed=3))
    assert cache.v_scale.shape[-1] == D // gv
    assert worst < 2e-5


def test_pool_with_clipped_ranges_matches_its_oracle():
    spec = KVQuantSpec(4, 2, 8, 8, clip=True)
    worst, *_ = _run(spec, 8, True, _schedule(8, 8, seed=2))
    assert worst < 2e-5


def test_layers_quantize_their_own_groups():
    """Decode flushes are quantized for every layer at once (at the last layer's write):
    a 3-layer pool fed different K/V per layer must equal three 1-layer pools fed each
    layer's data, output for output (1-layer pools are checked against the oracle above)."""
    spec, g = KVQuantSpec(4, 2, 8, 8), 8
    sched = _schedule(g, 8, seed=4)

    def run(layers, only=None):
        torch.manual_seed(0)
        cache = KIVIKVCache(num_layers=layers, num_kv_heads=H, head_dim=D, num_blocks=64, spec=spec,
                            num_seq_slots=4, sink=8, use_hadamard=True, fp_dtype=torch.float32)
        outs = []
        for _, t, meta in drive(cache, sched)[2]:
            k, v, q = torch.randn(t, H, D), torch.randn(t, H, D), torch.randn(t, HEADS, D)
            per_layer = []
            for layer in range(3):  # layer l's data: (k + l, v * (l + 1), q)
                if only is None or layer == only:
                    li = layer if only is None else 0
                    cache.write(li, k + layer, v * (layer + 1), meta)
                    per_layer.append(cache.attend(li, q, meta))
            outs.append(per_layer)
        return outs

    multi = run(3)
    for layer in range(3):
        single = run(1, only=layer)
        for m, s in zip(multi, single):
            assert torch.allclose(m[layer], s[0], atol=1e-6, rtol=0)
