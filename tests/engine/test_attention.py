"""attention.prefill_attention: its two paths (grouped matmuls for tiny chunks, torch's SDPA
otherwise) against a float64 oracle written out per query row, with GQA and a cached prefix
(the chunk is the LAST q_len positions of the context)."""

from __future__ import annotations

import pytest
import torch

import bastion.engine.attention as attention


def _oracle(q, k, v, scale):
    q_len, h, _ = q.shape
    ctx, kvh = k.shape[0], k.shape[1]
    out = torch.empty(q_len, h, q.shape[2], dtype=torch.float64)
    for i in range(q_len):
        seen = ctx - q_len + i + 1  # causal: row i sees positions 0 .. offset + i
        for j in range(h):
            kk, vv = k[:seen, j // (h // kvh)].double(), v[:seen, j // (h // kvh)].double()
            p = torch.softmax(kk @ q[i, j].double() * scale, dim=0)
            out[i, j] = p @ vv
    return out


@pytest.mark.parametrize("q_len,ctx", [(1, 1), (5, 5), (16, 16), (7, 40), (64, 64)])
@pytest.mark.parametrize("manual_max", [0, 10**9])  # every size on SDPA; every size on matmuls
def test_prefill_attention_paths_match_the_oracle(q_len, ctx, manual_max, monkeypatch):
    monkeypatch.setattr(attention, "_MANUAL_PREFILL_MAX", manual_max)
    g = torch.Generator().manual_seed(q_len * 100 + ctx)
    q, k, v = (torch.randn(n, h, 32, generator=g) for n, h in ((q_len, 8), (ctx, 2), (ctx, 2)))
    got = attention.prefill_attention(q, k, v, 32 ** -0.5)
    assert float((got.double() - _oracle(q, k, v, 32 ** -0.5)).abs().max()) <= 1e-5


def _segments(shapes, kvh=2, d=32, seed=0):
    """A step's prompt chunks over a shared slot pool: (q [T, 8, d], k, v [slots, kvh, d],
    segments), each chunk's context scattered over the pool as paging leaves it."""
    from bastion.engine.kv_cache.base import PrefillSegment

    g = torch.Generator().manual_seed(seed)
    slots = 4 * sum(c for _, c in shapes)
    k, v = torch.randn(slots, kvh, d, generator=g), torch.randn(slots, kvh, d, generator=g)
    perm = torch.randperm(slots, generator=g)
    segs, row, used = [], 0, 0
    for q_len, ctx in shapes:
        segs.append(PrefillSegment(row, q_len, perm[used: used + ctx]))
        row, used = row + q_len, used + ctx
    return torch.randn(row, 8, d, generator=g), k, v, segs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_chunks_batched_equal_one_by_one(dtype):
    """A step of many short chunks (what the gate's scans send: a few forced tokens after a
    cached prompt) runs as one padded batch, equal to the chunks one by one and to the
    float64 oracle; padding neither leaks into a chunk nor writes another's rows."""
    shapes = [(2, 40), (5, 44), (3, 41), (16, 50), (2, 2), (7, 47), (4, 52)]
    q, k, v, segs = _segments(shapes)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    batches, rest = attention.plan_prefill_batch(segs)
    # by q_len: (2, 2, 3) and (4, 5, 7) batched; 16 would more than double its group's work
    assert [b.rows.shape for b in batches] == [(3, 3), (3, 7)] and [s.q_len for s in rest] == [16]
    out = torch.full_like(q, float("nan"))
    for batch in batches:
        out[batch.dest] = attention.batched_prefill_attention(q, k, v, batch, 32 ** -0.5)
    for s in rest:
        out[s.q_start: s.q_start + s.q_len] = attention.prefill_attention(
            q[s.q_start: s.q_start + s.q_len], k[s.ctx_slots], v[s.ctx_slots], 32 ** -0.5)
    assert not out.isnan().any()  # every row written
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for s in segs:
        rows = slice(s.q_start, s.q_start + s.q_len)
        one = attention.prefill_attention(q[rows], k[s.ctx_slots], v[s.ctx_slots], 32 ** -0.5)
        assert float((out[rows].float() - one.float()).abs().max()) <= tol
        ref = _oracle(q[rows].float(), k[s.ctx_slots].float(), v[s.ctx_slots].float(), 32 ** -0.5)
        assert float((out[rows].double() - ref).abs().max()) <= (1e-5 if dtype == torch.float32 else 5e-2)


def test_big_or_lopsided_chunks_are_not_batched():
    """A chunk past the matmul path's size runs on SDPA alone; a chunk whose padding would
    more than double a group's work (a long query among short ones) runs alone too."""
    _, _, _, segs = _segments([(2, 40), (3, 41), (64, 64)])
    (batch,), rest = attention.plan_prefill_batch(segs)
    assert [s.q_len for s in rest] == [64] and batch.rows.shape == (2, 3)
    _, _, _, segs = _segments([(2, 40), (2, 30), (16, 60)])
    (batch,), rest = attention.plan_prefill_batch(segs)
    assert batch.rows.shape == (2, 2) and [s.q_len for s in rest] == [16]
    _, _, _, segs = _segments([(2, 40)])
    assert attention.plan_prefill_batch(segs) == ([], segs)
