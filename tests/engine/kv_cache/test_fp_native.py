"""The fp32 cache's native decode attention (csrc/fp_decode.cpp) against the torch path
(gather + attention.decode_attention) on the same pool, block tables and lengths."""

from __future__ import annotations

import pytest
import torch

from bastion.engine.attention import decode_attention
from bastion.engine.kv_cache.native import load_fp_kernel


@pytest.fixture(scope="module")
def kernel():
    mod = load_fp_kernel("auto")
    if mod is None:
        pytest.skip("no C++ compiler: the native kernel did not build (torch path serves)")
    return mod


@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (8, 8, 128), (4, 1, 16)])
def test_matches_gather_and_torch_attention(kernel, heads, kv_heads, d):
    torch.manual_seed(heads)
    block, num_blocks = 16, 40
    k = torch.randn(num_blocks * block, kv_heads, d)
    v = torch.randn_like(k)
    lens = torch.tensor([1, 17, 100, 33])
    nblk = int(-(-lens.max() // block))
    perm = torch.randperm(num_blocks)[: 4 * nblk].view(4, nblk)  # scattered blocks
    q = torch.randn(4, heads, d)
    out = kernel.fp_decode_attention(q, k, v, perm.contiguous(), lens, block, d ** -0.5)
    pos = torch.arange(int(lens.max()))
    slots = perm[:, pos // block] * block + pos % block
    ref = decode_attention(q, k[slots], v[slots], pos[None, :] < lens[:, None], d ** -0.5)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), float((out - ref).abs().max())


def test_bad_tables_are_errors_not_crashes(kernel):
    k = torch.randn(32, 1, 16)
    q = torch.randn(1, 2, 16)
    with pytest.raises(RuntimeError, match="outside the pool"):
        kernel.fp_decode_attention(q, k, k, torch.tensor([[5]]), torch.tensor([3]), 16, 0.25)
    with pytest.raises(RuntimeError, match="context length"):
        kernel.fp_decode_attention(q, k, k, torch.tensor([[0]]), torch.tensor([40]), 16, 0.25)
