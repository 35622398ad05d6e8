"""Artifact layer of the adapter gate: directory walk, pickle sniffing, hashing and a
strict, bounded safetensors parser.

Nothing here executes or deserialises code: pickle-capable files are recognised by name
and by their first bytes and refused, never opened with pickle/torch.load/np.load. The
safetensors header is parsed with our own code (bounded reads, JSON with duplicate-key
and NaN rejection), every offset is checked before a single tensor byte is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bastion.safe_io import open_regular, read_regular  # noqa: F401  (read_regular re-exported)

# Files a PEFT LoRA adapter needs, and files known to be harmless next to it.
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
BENIGN_FILES = {"README.md", "training_report.json", ".gitattributes", "LICENSE", "LICENSE.txt"}
TOKENIZER_FILES = {
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
}
# Extensions whose usual loaders (torch.load, pickle, joblib, np.load(allow_pickle)) unpickle.
PICKLE_EXTENSIONS = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".dill", ".sav", ".mar",
                     ".pdparams", ".pdmodel", ".h5", ".hdf5", ".keras", ".msgpack"}
CODE_EXTENSIONS = {".py", ".pyc", ".pyo", ".so", ".dll", ".dylib", ".sh", ".exe", ".ipynb"}

SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
ALL_SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
                          "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}


class HeaderError(ValueError):
    """The safetensors file is malformed or unsafe; the message says how, `check` names
    the finding (safetensors.header, safetensors.header_size, safetensors.offsets)."""

    def __init__(self, message: str, check: str = "safetensors.header"):
        super().__init__(message)
        self.check = check


@dataclass
class DirEntry:
    rel: str                     # path relative to the adapter directory, '/'-separated
    kind: str                    # file, dir, symlink, special
    size: int = 0
    sha256: str | None = None
    target: str | None = None    # symlink target


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int                   # offsets relative to the data section
    end: int


@dataclass
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_len: int
    data_len: int
    problems: list[tuple[str, str]] = field(default_factory=list)  # (check, message) -> fail


def walk(root: Path, *, max_files: int, max_depth: int) -> tuple[list[DirEntry], bool]:
    """Every entry under root, without following symlinks. Returns (entries, truncated)."""
    out: list[DirEntry] = []
    stack = [(root, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            if len(out) >= max_files:
                return out, True
            p = d / name
            rel = p.relative_to(root).as_posix()
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out.append(DirEntry(rel, "symlink", target=os.readlink(p)))
            elif stat.S_ISDIR(st.st_mode):
                out.append(DirEntry(rel, "dir"))
                if depth + 1 < max_depth:
                    stack.append((p, depth + 1))
            elif stat.S_ISREG(st.st_mode):
                out.append(DirEntry(rel, "file", size=st.st_size))
            else:
                out.append(DirEntry(rel, "special"))
    return out, False


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        while size > 0 and (block := f.read(min(chunk, size))):  # never more than the stat said
            h.update(block)
            size -= len(block)
    return h.hexdigest()


def sniff_pickle(path: Path) -> str | None:
    """Why this file can carry a pickle (by content), or None. Reads at most a few KB and
    zip directory names; never unpickles."""
    try:
        with open_regular(path) as f:
            head = f.read(16)
    except OSError:
        return None
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return f"starts with a pickle protocol-{head[1]} opcode"
    if head[:1] in (b"(", b"]", b"}") and path.suffix.lower() in PICKLE_EXTENSIONS:
        return "starts like a protocol-0/1 pickle"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()[:10000]
                pk = [n for n in names if n.endswith((".pkl", ".pickle"))]
                if pk:
                    return f"a zip archive holding a pickle ({pk[0]}; torch.save format)"
                for n in names:
                    if n.endswith(".npy"):
                        with z.open(n) as member:
                            why = _npy_object_dtype(member)
                        if why:
                            return f"zip member {n}: {why}"
        except (zipfile.BadZipFile, OSError, ValueError, RuntimeError):
            return "a zip archive that cannot be listed"
    if head[:6] == b"\x93NUMPY":
        with open_regular(path) as f:
            return _npy_object_dtype(f)
    return None


def _npy_object_dtype(f) -> str | None:
    """numpy's header reader is a literal parser (no pickle); object dtypes need pickle to load."""
    from numpy.lib import format as npf

    try:
        version = npf.read_magic(f)
        if version == (1, 0):
            _, _, dtype = npf.read_array_header_1_0(f)
        else:
            _, _, dtype = npf.read_array_header_2_0(f)
    except Exception as e:  # malformed header: loaders would refuse it anyway
        return f"a .npy file with an unreadable header ({type(e).__name__})"
    if dtype.hasobject:
        return f"a .npy array with object dtype {dtype} (np.load needs allow_pickle=True)"
    return None


def _no_dupes(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise HeaderError(f"duplicate JSON key {k!r}")
        out[k] = v
    return out


def _no_constants(name):
    raise HeaderError(f"non-standard JSON constant {name}")


def strict_json(text: str | bytes):
    """JSON with duplicate keys and NaN/Infinity refused (they parse differently per library)."""
    return json.loads(text, object_pairs_hook=_no_dupes, parse_constant=_no_constants)


def parse_safetensors_header(path: Path, *, max_header_bytes: int, max_tensors: int) -> SafetensorsHeader:
    """Validate the whole header and the data layout; raises HeaderError on anything that
    would make tensor reads ambiguous or out of bounds. Soft problems (non-allowlisted
    dtypes) are returned in .problems so the rest of the scan can still report."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise HeaderError(f"file is {size} bytes; a safetensors file starts with an 8-byte header length")
        n = int.from_bytes(f.read(8), "little")
        if n > max_header_bytes:
            raise HeaderError(f"header length {n} bytes exceeds the limit {max_header_bytes}",
                              "safetensors.header_size")
        if n > size - 8:
            raise HeaderError(f"header length {n} runs past the end of the file ({size} bytes)",
                              "safetensors.header_size")
        raw = f.read(n)
    if not raw.startswith(b"{"):
        raise HeaderError("header does not start with '{'")
    try:
        header = strict_json(raw.decode("utf-8").rstrip(" "))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeaderError(f"header is not valid UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object")
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise HeaderError("__metadata__ must map strings to strings")
    if len(header) > max_tensors:
        raise HeaderError(f"{len(header)} tensors exceeds the limit {max_tensors}")
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    problems: list[tuple[str, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise HeaderError(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in ALL_SAFETENSORS_DTYPES:
            raise HeaderError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)):
            raise HeaderError(f"tensor {name!r}: bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise HeaderError(f"tensor {name!r}: bad data_offsets {offs!r}")
        begin, end = offs
        if not 0 <= begin <= end <= data_len:
            raise HeaderError(f"tensor {name!r}: data_offsets [{begin}, {end}] out of bounds "
                              f"(data section is {data_len} bytes)", "safetensors.offsets")
        nbytes = int(np.prod(shape, dtype=object)) * ALL_SAFETENSORS_DTYPES[dtype]
        if end - begin != nbytes:
            raise HeaderError(f"tensor {name!r}: data_offsets span {end - begin} bytes but "
                              f"{dtype}{shape} needs {nbytes}", "safetensors.offsets")
        if dtype not in SAFETENSORS_DTYPES:
            problems.append(("safetensors.dtype", f"tensor {name!r} has dtype {dtype}; only "
                             f"{', '.join(SAFETENSORS_DTYPES)} are accepted for LoRA factors"))
        tensors[name] = TensorInfo(name, dtype, tuple(shape), begin, end)
    pos = 0
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin < pos:
            raise HeaderError(f"tensor {t.name!r}: data_offsets [{t.begin}, {t.end}] overlap another tensor",
                              "safetensors.offsets")
        if t.begin > pos:
            raise HeaderError(f"{t.begin - pos} unindexed bytes before tensor {t.name!r} (hidden data)",
                              "safetensors.offsets")
        pos = t.end
    if pos != data_len:
        raise HeaderError(f"{data_len - pos} unindexed bytes after the last tensor (hidden data)",
                          "safetensors.offsets")
    return SafetensorsHeader(tensors, meta, n, data_len, problems)


def read_tensor(path: Path, header: SafetensorsHeader, t: TensorInfo) -> np.ndarray:
    """One tensor as float64 (only allowlisted dtypes; offsets were validated)."""
    with open_regular(path) as f:
        f.seek(8 + header.header_len + t.begin)
        buf = f.read(t.end - t.begin)
    arr = np.frombuffer(buf, dtype=SAFETENSORS_DTYPES[t.dtype])
    if t.dtype == "BF16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float64).reshape(t.shape)
