"""Raw GGUF tensor bytes for tests, in any type the weight path keeps."""

from __future__ import annotations

import numpy as np


def gguf_bytes(type_name: str, n: int, k: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Raw bytes [n, bytes per row] of an [n, k] tensor of `type_name`: gguf-py's quantizer
    over N(0, scale^2) values where it has one, else random blocks with sane fp16 scales
    (any bytes are a valid K-quant block)."""
    import gguf

    qt = getattr(gguf.GGMLQuantizationType, type_name)
    w = (rng.standard_normal((n, k)) * scale).astype(np.float32)
    try:
        return gguf.quants.quantize(w, qt).reshape(n, -1)
    except NotImplementedError:
        block, size = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, size=(n * k // block, size), dtype=np.uint8)
        d = (rng.uniform(0.001, 0.05, size=(raw.shape[0], 2)) * scale).astype(np.float16).view(np.uint8)
        if type_name == "Q4_K":
            raw[:, 0:4] = d.reshape(-1, 4)
        else:  # Q6_K: d is the block's last 2 bytes
            raw[:, 208:210] = d[:, :2]
        return raw.reshape(n, -1)
