"""Keeping the process's memory the model's while weights load (glibc hosts).

glibc serves allocations under its mmap threshold from the heap, and the threshold grows
(up to 32 MiB) each time a mapped block is freed. Loading frees many tensor-sized buffers
between the ones it keeps (the raw bytes read from the file, q/k/v parts once fused), so
the heap fragments: measured on a 7B Q4_0 file, 5.62 GB resident after the build for
3.94 GB of weights, the difference free but never returned. During the load every block
over 1 MiB is its own mapping, returned to the OS when freed; after it the threshold is
pinned at 32 MiB (step-sized buffers are reused from the heap, not faulted in again) and
the heap is trimmed once. Elsewhere (not glibc) this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator

_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def loading_memory(threshold: int = 1 << 20, after: int = 32 << 20) -> Iterator[None]:
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, after)
            libc.malloc_trim(0)
