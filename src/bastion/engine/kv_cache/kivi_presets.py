"""The KIVI cache's named configurations (`--kv-cache kivi|int8|kivi4|kivi2|kXvY`) and
their options with defaults filled in and checked. Pure Python: config.py validates a
cache kind with it at start-up, the cache factory builds from it."""

from __future__ import annotations

import re

# quantized presets -> (k_bits, v_bits); "kXvY" (X, Y in 2/4/8) names any other pair
PRESETS = {"int8": (8, 8), "kivi4": (4, 4), "kivi2": (2, 2), "kivi": (4, 2)}


def kv_bits(kind: str) -> tuple[int, int] | None:
    """(k_bits, v_bits) of a quantized kind, None for anything else."""
    if kind in PRESETS:
        return PRESETS[kind]
    m = re.fullmatch(r"k([248])v([248])", kind)
    return (int(m[1]), int(m[2])) if m else None


def quant_options(kind: str, given: dict) -> dict:
    """Group size, residual window, sink, rotation, clipping and value group of a quantized
    kind: `given` (group_size, residual, sink, hadamard, clip, value_group; None = the
    preset's) over the preset's defaults. ValueError names the flag of a bad value."""
    preset = {"group_size": 32, "residual": 128, "sink": 0, "hadamard": False, "clip": False, "value_group": None}
    if kind == "kivi":  # the default quantized config (measured: docs/BENCHMARKS.md):
        # K4V2, G = 32, R = 64, a 32-token fp sink, Hadamard-rotated K and V: the one
        # config that keeps <= 1% dPPL and >= 95% top-1 at 2k and 8k (3.5-3.9x smaller)
        preset.update(residual=64, sink=32, hadamard=True)
    opts = {k: preset[k] if given.get(k) is None else given[k] for k in preset}
    g = opts["group_size"]
    for name, v in (("kv_group_size", g), ("kv_value_group", opts["value_group"])):
        if v is not None and (not isinstance(v, int) or v <= 0 or v % 4):
            raise ValueError(f"{name}={v!r}: must be a positive multiple of 4")
    if not isinstance(opts["residual"], int) or opts["residual"] < 0:
        raise ValueError(f"kv_residual={opts['residual']!r}: must be >= 0")
    if not isinstance(opts["sink"], int) or opts["sink"] < 0 or opts["sink"] % g:
        raise ValueError(f"kv_sink={opts['sink']!r}: must be >= 0 and a multiple of the group size {g}")
    return opts
