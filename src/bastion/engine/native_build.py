"""Compiling the project's C++ kernels with torch's JIT extension builder.

Each kernel is built on first use on the machine that runs it (hence -march=native: the
compiler's own ISA macros pick the AVX-512, AVX2 or scalar body), and torch caches the
build on disk under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), keyed by
name, sources and flags. A failed build is an answer, not an exception: callers fall
back to torch ops (and say why) unless the user asked for the native kernel.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

# Not -ffast-math: masked scores are -inf and must stay so.
BASE_CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros")
# Instruction sets a kernel can be built for: the machine's own, or a lower one to test
# the fallback bodies on a machine that has more.
ISA_FLAGS = {"native": ("-march=native",), "avx2": ("-mavx2", "-mfma", "-mf16c"), "scalar": ()}


@functools.cache
def build(name: str, source: Path | tuple[Path, ...], isa: str = "native",
          defines: tuple[str, ...] = ()) -> tuple[ModuleType | None, str]:
    """(module, "") or (None, why). Cached per process: one build attempt per (name, isa,
    defines); `defines`: extra -D macros (also part of the cache key on disk)."""
    if isa not in ISA_FLAGS:
        raise ValueError(f"isa {isa!r}: expected one of {tuple(ISA_FLAGS)}")
    try:
        from torch.utils.cpp_extension import load

        # torch's version in the name: the on-disk cache is keyed by name, sources and flags,
        # not by the torch it was built against, and the module links against libtorch
        full = f"{name}_{isa}_" + re.sub(r"\W", "_", torch.__version__)
        log.info("loading native kernel %s (compiled on first use per machine, ~25 s)", full)
        sources = [str(s) for s in (source if isinstance(source, tuple) else (source,))]
        mod = load(full, sources, extra_cflags=[*BASE_CFLAGS, *ISA_FLAGS[isa], *(f"-D{d}" for d in defines)], verbose=False)
        return mod, ""
    except Exception as e:  # no compiler, no ninja, a compile error: all mean "use torch ops"
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
