"""Helpers shared by the KIVI quantizer and quantized-attention tests
(test_kivi_quantizer.py, test_kivi_quant.py): synthetic key/value data and the
one-thread autouse fixture (import it into a test module to apply it there)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _kv(t, h, d, seed, outlier=20.0):
    """Key-like data [t, h, d]: gaussian, a few channels `outlier`x larger, per-channel
    offsets (outlier=0: plain gaussian, value-like)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, d, generator=gen)
    if outlier:
        x[:, :, :: max(1, d // 4)] *= outlier
        x += torch.randn(1, h, d, generator=gen) * 3.0
    return x
