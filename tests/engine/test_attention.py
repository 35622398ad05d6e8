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
