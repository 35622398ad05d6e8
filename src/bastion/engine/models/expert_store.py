"""The disk tier of expert offload: every expert's weights left where they lie in the model
file, reachable through a read-only mmap (nothing is read or copied at start-up).

An expert is three matrices, gate [I, H], up [I, H], down [H, I], each at a byte span of
the file: a GGUF's stacked `ffn_{gate,up,down}_exps` [E, N, K] tensors (expert e at
data_offset + e * N*K*itemsize) or an HF directory's safetensors shards (per-expert
tensors, Mixtral's w1/w3/w2 included, or transformers 5.x's fused gate_up_proj [E, 2I, H]
and down_proj [E, H, I], sliced). Dense F32/F16/BF16 experts, and a GGUF's quantized ones in the types the
weight path keeps (qweights.GGUF_KEPT: Q4_0, Q4_1, Q4_K, Q8_0, Q6_K): their spans hand
out the raw blocks (uint8), which expert_format.py repacks for the kernel.

Two ways to get an expert's weights:
- `view(key)`: tensors over the mmap itself (zero copy). Running an expert on them streams
  its bytes through once; the pages come from the page cache, or from the disk on a miss.
- `read(key)`: the bytes pread into one owned buffer (what the RAM cache keeps).
`release(key)` undoes what either left behind: the mapping's pages are dropped from this
process (madvise DONTNEED) and, when `drop_page_cache` (the honest "cold" measurement: the
page cache may not act as a second, unbudgeted expert cache), from the page cache too
(posix_fadvise DONTNEED). With `drop_page_cache` off the page cache keeps whatever the OS
likes ("warm": disk reads are RAM copies).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from bastion.engine.models.arch import UnsupportedModelError
from bastion.engine.models.moe import canonical_name
from bastion.engine.models.qweights import GGUF_KEPT
from bastion.gguf_header import read_gguf_header

_PAGE = mmap.PAGESIZE
_ALIGN = 64  # bytes: the widest SIMD alignment a kernel may branch on
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_GGUF_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_GGUF_PROJ = {"ffn_gate_exps": 0, "ffn_up_exps": 1, "ffn_down_exps": 2}
_HF_PROJ = {"gate_proj": 0, "up_proj": 1, "down_proj": 2}

Key = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class Span:
    """One matrix of one expert in the file: rows x cols of `dtype` at byte `offset`, or,
    where `qtype` names a GGUF quantization type, `raw_bytes` of its blocks (dtype uint8)."""
    file: int  # index into ExpertStore.files
    offset: int
    shape: tuple[int, int]
    dtype: torch.dtype
    qtype: str | None = None
    raw_bytes: int = 0

    @property
    def nbytes(self) -> int:
        return self.raw_bytes if self.qtype else self.shape[0] * self.shape[1] * self.dtype.itemsize

    def tensor(self, flat: torch.Tensor) -> torch.Tensor:
        """The span's bytes (uint8, nbytes of them) as what it holds: [rows, cols] of dtype,
        or the raw blocks themselves when quantized."""
        return flat if self.qtype else flat.view(self.dtype).view(self.shape)


class _File:
    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        # NOTE: ACCESS_COPY (MAP_PRIVATE): reads share the page cache; the buffer is writable
        # for torch.frombuffer, and nothing ever writes it.
        self.map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)


class ExpertStore:
    """(layer, expert) -> its three spans; views over the mmap, preads, page drops."""

    def __init__(self, paths: list[Path], spans: dict[Key, tuple[Span, Span, Span]], *,
                 drop_page_cache: bool = False):
        if not spans:
            raise UnsupportedModelError("no expert tensors found to offload")
        self.files = [_File(p) for p in paths]
        self.spans = spans
        self.drop_page_cache = drop_page_cache
        self.layers = sorted({k[0] for k in spans})
        self.num_experts = 1 + max(k[1] for k in spans)
        self.total_bytes = sum(self.expert_bytes(k) for k in spans)

    @classmethod
    def open(cls, path: str | Path, *, drop_page_cache: bool = False) -> ExpertStore:
        """The experts of a GGUF file or an HF safetensors directory."""
        p = Path(path)
        if p.is_file():
            return cls([p], _gguf_spans(p), drop_page_cache=drop_page_cache)
        files = sorted(p.glob("*.safetensors"))
        return cls(files, _safetensors_spans(files), drop_page_cache=drop_page_cache)

    def expert_bytes(self, key: Key) -> int:
        return sum(s.nbytes for s in self.spans[key])

    def view(self, key: Key) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gate, up, down as tensors over the mmap (zero copy; the first touch faults pages in)."""
        return tuple(s.tensor(torch.frombuffer(self.files[s.file].map, dtype=torch.uint8, count=s.nbytes,
                                               offset=s.offset)) for s in self.spans[key])

    def read(self, key: Key) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gate, up, down pread into one fresh buffer (owned memory; what the RAM tier holds)."""
        spans = self.spans[key]
        buf = torch.empty(sum(s.nbytes for s in spans) + _ALIGN * len(spans), dtype=torch.uint8)
        raw = memoryview(buf.numpy())
        out, at = [], 0
        for s in spans:
            # NOTE: each copy keeps its address mod 64 equal to the file offset's (so to the
            # mmap view's): CPU GEMV kernels pick their code path by alignment, and a copy at
            # another alignment would round differently from the streamed view (measured).
            at += (s.offset - buf.data_ptr() - at) % _ALIGN
            _pread_into(self.files[s.file].fd, raw[at:at + s.nbytes], s.offset)
            out.append(s.tensor(buf[at:at + s.nbytes]))
            at += s.nbytes
        if self.drop_page_cache:
            for s in spans:
                lo, hi = self._pages(s)
                os.posix_fadvise(self.files[s.file].fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
        return tuple(out)

    def _pages(self, s: Span) -> tuple[int, int]:
        """The span rounded outwards to whole pages (within the file)."""
        return s.offset // _PAGE * _PAGE, min(len(self.files[s.file].map), -(-(s.offset + s.nbytes) // _PAGE) * _PAGE)

    def release(self, key: Key) -> None:
        """Drop the expert's mapped pages from this process, and from the page cache when
        `drop_page_cache`. Page-rounded outwards: a neighbour's pages may go too, which only
        costs it a fault, or a re-read (the RAM tier holds its own copies, never mapped pages).
        A page another mapping still maps stays in the page cache (the kernel's rule)."""
        for s in self.spans[key]:
            f = self.files[s.file]
            lo, hi = self._pages(s)
            f.map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            if self.drop_page_cache:
                os.posix_fadvise(f.fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)

    def drop_all(self) -> None:
        """Every expert released (a cold start for the benchmark)."""
        for key in self.spans:
            self.release(key)


def _pread_into(fd: int, dst: memoryview, offset: int) -> None:
    done = 0
    while done < len(dst):
        n = os.preadv(fd, [dst[done:]], offset + done)
        if n <= 0:
            raise OSError(f"short read at offset {offset + done}")
        done += n


def _gguf_spans(path: Path) -> dict[Key, tuple[Span, Span, Span]]:
    # NOTE: the header alone (gguf_header.py), not gguf.GGUFReader and its per-element
    # metadata objects: only names, types, shapes and offsets are needed here
    parts: dict[Key, list] = {}
    for t in read_gguf_header(path).tensors:
        base = t.name.rpartition(".")[0]
        if not base.startswith("blk.") or base.split(".", 2)[2] not in _GGUF_PROJ:
            continue
        layer, proj = int(base.split(".")[1]), _GGUF_PROJ[base.split(".", 2)[2]]
        kind = t.type_name
        if kind not in _GGUF_DTYPES and kind not in GGUF_KEPT:
            raise UnsupportedModelError(f"expert offload needs F32/F16/BF16 or {'/'.join(GGUF_KEPT)} experts; "
                                        f"{t.name} is {kind} (run without --moe-memory)")
        e, n, k = (int(x) for x in reversed(t.shape))
        quantized = kind in GGUF_KEPT
        dtype = torch.uint8 if quantized else _GGUF_DTYPES[kind]
        step = t.nbytes // e if quantized else n * k * dtype.itemsize
        for i in range(e):
            parts.setdefault((layer, i), [None] * 3)[proj] = Span(
                0, t.offset + i * step, (n, k), dtype, kind if quantized else None, step if quantized else 0)
    return _complete(parts)


def _safetensors_spans(files: list[Path]) -> dict[Key, tuple[Span, Span, Span]]:
    parts: dict[Key, list] = {}
    for fi, f in enumerate(files):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        base = 8 + n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            name = canonical_name(name)
            if ".mlp.experts." not in name:
                continue
            if meta["dtype"] not in _ST_DTYPES:
                raise UnsupportedModelError(f"expert offload needs F32/F16/BF16 experts; {name} is {meta['dtype']}")
            dtype, shape, off = _ST_DTYPES[meta["dtype"]], meta["shape"], base + meta["data_offsets"][0]
            layer = int(name.split(".")[2])
            tail = name.split(".mlp.experts.", 1)[1]
            if tail in ("gate_up_proj", "down_proj"):  # transformers 5.x fused [E, 2I, H] / [E, H, I]
                e, rows, cols = shape
                step = rows * cols * dtype.itemsize
                for i in range(e):
                    if tail == "down_proj":
                        parts.setdefault((layer, i), [None] * 3)[2] = Span(fi, off + i * step, (rows, cols), dtype)
                        continue
                    half = rows // 2
                    p = parts.setdefault((layer, i), [None] * 3)
                    p[0] = Span(fi, off + i * step, (half, cols), dtype)
                    p[1] = Span(fi, off + i * step + half * cols * dtype.itemsize, (half, cols), dtype)
                continue
            e, proj, _ = tail.split(".", 2)
            parts.setdefault((layer, int(e)), [None] * 3)[_HF_PROJ[proj]] = Span(fi, off, tuple(shape), dtype)
    return _complete(parts)


def _complete(parts: dict[Key, list]) -> dict[Key, tuple[Span, Span, Span]]:
    for key, p in parts.items():
        if any(s is None for s in p):
            raise UnsupportedModelError(f"layer {key[0]} expert {key[1]}: gate, up and down not all found")
    return {k: tuple(v) for k, v in sorted(parts.items())}
