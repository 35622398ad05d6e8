"""What a GGUF file holds, read from its header alone: metadata scalars, and each tensor's
name, type and shape (never its data).

`gguf.GGUFReader` parses every element of every metadata array into numpy objects (the
tokenizer's vocabulary and merges: ~2 s for a 135M model, more for 150k-token
vocabularies), so this reads the header itself with the `gguf` package's constants,
skipping arrays by their length. Every count and length is checked against the file's
size before it is used, so a corrupt or truncated file ends as one `GGUFHeaderError`
naming the problem, never a huge allocation or a hang (devices and FIFOs are refused by
`safe_io.open_regular`).
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

import gguf

from bastion.safe_io import open_regular

_SCALARS = {gguf.GGUFValueType.UINT8: "B", gguf.GGUFValueType.INT8: "b", gguf.GGUFValueType.UINT16: "H",
            gguf.GGUFValueType.INT16: "h", gguf.GGUFValueType.UINT32: "I", gguf.GGUFValueType.INT32: "i",
            gguf.GGUFValueType.FLOAT32: "f", gguf.GGUFValueType.BOOL: "?", gguf.GGUFValueType.UINT64: "Q",
            gguf.GGUFValueType.INT64: "q", gguf.GGUFValueType.FLOAT64: "d"}
_MAX_DIMS = 8
_MAX_ARRAY_NESTING = 4
_KEEP_STRING = 4096  # longer metadata strings (chat templates) are skipped, not kept


class GGUFHeaderError(ValueError):
    """The file is not a readable GGUF file; the message says why."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str  # GGMLQuantizationType name (F32, Q4_1, Q6_K, ...) or "type N" if unknown
    shape: tuple[int, ...]  # GGUF order: the row (ne0) first
    offset: int = -1  # absolute file offset of the data
    nbytes: int | None = None  # None: a type this gguf version does not know

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def qtype(self) -> gguf.GGMLQuantizationType | None:
        return gguf.GGMLQuantizationType.__members__.get(self.type_name)


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, object]  # scalars and short strings; arrays as their length (int)
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get(gguf.Keys.General.ARCHITECTURE)
        return arch if isinstance(arch, str) else None

    @property
    def context_length(self) -> int | None:
        value = self.metadata.get(gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=self.architecture))
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def parameters(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def tensor_types(self) -> dict[str, int]:
        """Tensor type -> parameters stored in it, most first."""
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.type_name] = out.get(t.type_name, 0) + t.n_elements
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    @property
    def quantization(self) -> str | None:
        """The file type llama.cpp's quantizer wrote (Q4_K_M, Q8_0, F16, ...), else the
        type holding most of the parameters."""
        value = self.metadata.get(gguf.Keys.General.FILE_TYPE)
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                name = gguf.LlamaFileType(value & ~gguf.LlamaFileType.GUESSED).name
            except ValueError:
                name = None
            if name:
                return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        types = self.tensor_types()
        return next(iter(types), None)


class _Cursor:
    """Sequential reads that never pass the end of the file."""

    def __init__(self, f, size: int, endian: str) -> None:
        self.f, self.size, self.endian, self.pos = f, size, endian, 0

    def read(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise GGUFHeaderError(f"truncated: {what} at byte {self.pos} runs past the end of the file "
                                  f"({self.size} bytes)")
        data = self.f.read(n)
        if len(data) != n:
            raise GGUFHeaderError(f"truncated: the file ended while reading {what} at byte {self.pos}")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFHeaderError(f"truncated: {what} at byte {self.pos} runs past the end of the file "
                                  f"({self.size} bytes)")
        self.f.seek(n, 1)
        self.pos += n

    def unpack(self, fmt: str, what: str):
        return struct.unpack(self.endian + fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str, keep: bool = True) -> str | None:
        n = self.unpack("Q", f"length of {what}")
        if not keep or n > _KEEP_STRING:
            self.skip(n, what)
            return None
        return self.read(n, what).decode("utf-8", errors="replace")


def _value_type(raw: int, key: str) -> gguf.GGUFValueType:
    try:
        return gguf.GGUFValueType(raw)
    except ValueError:
        raise GGUFHeaderError(f"metadata {key!r}: unknown value type {raw}") from None


def _skip_array(cur: _Cursor, key: str, depth: int) -> int:
    """Skips an array's elements; returns its length."""
    if depth > _MAX_ARRAY_NESTING:
        raise GGUFHeaderError(f"metadata {key!r}: arrays nested deeper than {_MAX_ARRAY_NESTING}")
    elem = _value_type(cur.unpack("I", f"element type of {key!r}"), key)
    count = cur.unpack("Q", f"length of {key!r}")
    if elem in _SCALARS:
        cur.skip(count * struct.calcsize(_SCALARS[elem]), f"array {key!r}")
        return count
    if count * 8 > cur.size - cur.pos:  # every string or array element takes at least 8 bytes
        raise GGUFHeaderError(f"metadata {key!r}: {count} elements cannot fit in the file")
    for _ in range(count):
        if elem == gguf.GGUFValueType.STRING:
            cur.string(f"array {key!r}", keep=False)
        else:
            _skip_array(cur, key, depth + 1)
    return count


def _value(cur: _Cursor, key: str):
    vtype = _value_type(cur.unpack("I", f"value type of {key!r}"), key)
    if vtype in _SCALARS:
        return cur.unpack(_SCALARS[vtype], f"value of {key!r}")
    if vtype == gguf.GGUFValueType.STRING:
        return cur.string(f"value of {key!r}")
    return _skip_array(cur, key, 1)


def _tensor(cur: _Cursor, index: int) -> tuple[TensorInfo, int, int | None]:
    """(info, data offset, data bytes or None for a type this gguf version does not know)."""
    name = cur.string(f"name of tensor {index}") or f"#{index}"
    n_dims = cur.unpack("I", f"rank of tensor {name!r}")
    if n_dims > _MAX_DIMS:
        raise GGUFHeaderError(f"tensor {name!r}: {n_dims} dimensions (at most {_MAX_DIMS})")
    shape = tuple(cur.unpack("Q", f"shape of tensor {name!r}") for _ in range(n_dims))
    raw_type = cur.unpack("I", f"type of tensor {name!r}")
    offset = cur.unpack("Q", f"offset of tensor {name!r}")
    try:
        qtype = gguf.GGMLQuantizationType(raw_type)
    except ValueError:
        return TensorInfo(name, f"type {raw_type}", shape), offset, None
    info = TensorInfo(name, qtype.name, shape)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if shape and shape[0] % block:
        raise GGUFHeaderError(f"tensor {name!r}: row of {shape[0]} is not a whole number of "
                              f"{qtype.name} blocks ({block})")
    return info, offset, info.n_elements // block * type_size


def read_gguf_header(path: Path | str) -> GGUFHeader:
    """The header of a GGUF file (v2 or v3, either byte order); GGUFHeaderError if it is
    not one, or if a tensor's data would lie past the end of the file (a cut download)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8 or struct.unpack("<I", head[:4])[0] != gguf.GGUF_MAGIC:
            raise GGUFHeaderError("not a GGUF file (no GGUF magic at its start)")
        version = struct.unpack("<I", head[4:])[0]
        endian = "<"
        if version & 0xFFFF == 0 and version:  # written on a big-endian machine
            endian, version = ">", struct.unpack(">I", head[4:])[0]
        if version not in (2, 3):
            raise GGUFHeaderError(f"GGUF version {version} is not supported (2 or 3)")
        cur = _Cursor(f, size, endian)
        cur.pos = 8
        n_tensors = cur.unpack("Q", "tensor count")
        n_kv = cur.unpack("Q", "metadata count")
        if n_kv * 12 > size or n_tensors * 24 > size:
            raise GGUFHeaderError(f"{n_kv} metadata entries and {n_tensors} tensors cannot fit in {size} bytes")
        metadata: dict[str, object] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key {i}") or f"#{i}"
            metadata[key] = _value(cur, key)
        tensors, extents = [], []
        for i in range(n_tensors):
            info, offset, nbytes = _tensor(cur, i)
            tensors.append(info)
            extents.append((info.name, offset, nbytes))
        alignment = metadata.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
            raise GGUFHeaderError(f"general.alignment must be a positive integer, got {alignment!r}")
        data_start = -(-cur.pos // alignment) * alignment
        for name, offset, nbytes in extents:
            end = data_start + offset + (nbytes or 0)
            if end > size:
                raise GGUFHeaderError(f"truncated: tensor {name!r} ends at byte {end}, past the end of the "
                                      f"file ({size} bytes)")
        tensors = [replace(t, offset=data_start + offset, nbytes=nbytes)
                   for t, (_, offset, nbytes) in zip(tensors, extents)]
    return GGUFHeader(version=version, metadata=metadata, tensors=tensors)
