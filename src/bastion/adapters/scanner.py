"""The adapter vetting gate: `scan_adapter(path) -> ScanReport` (pass / warn / fail).

Three layers, cheapest first; a later layer runs only on what the earlier ones proved
safe to read:
  1. artifact (scanner_files, scanner_template): layout, pickles (refused by name and by
     content, never unpickled), symlinks/special files, size limits, hashes, strict
     safetensors header, tokenizer / chat-template overrides;
  2. config and structure (scanner_config): PEFT allowlist, code hooks, base model
     identity, target modules, tensor names, layers, shapes, ranks;
  3. weights (scanner_weights): NaN/Inf, per-module ΔW statistics, spread across layers,
     judged against calibrated thresholds.
A fourth layer, behaviour probes (base vs base+adapter, with and without candidate
triggers: adapters.behaviour.BehaviourProbe, which runs the model), plugs in through the
`behaviour` argument; without it a report says the probes did not run. See
docs/SECURITY.md for the threat model and the calibration.

The verdict is the worst finding's severity: any `fail` -> "fail", else any `warn` ->
"warn", else "pass". Nothing in a scan imports, unpickles or renders adapter content.
"""

from __future__ import annotations

import errno
import json
import math
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from bastion.adapters import scanner_files as sf
from bastion.adapters.base_info import BaseModelInfo, hf_weight_norms  # noqa: F401  (re-exported)
from bastion.adapters.scanner_config import LoraSpec, check_config, check_tensors, module_path
from bastion.adapters.scanner_template import inspect_tokenizer_file
from bastion.adapters.scanner_weights import ModuleStats, WeightThresholds, judge, module_stats, summarize

SCANNER_VERSION = "1"
SEVERITIES = ("info", "warn", "fail")
VERDICTS = ("pass", "warn", "fail")
EXIT_CODES = {"pass": 0, "warn": 3, "fail": 4}

@dataclass(frozen=True)
class Finding:
    check: str          # dotted id, e.g. "artifact.pickle", "config.base_model", "weights.norm"
    severity: str       # info | warn | fail
    message: str
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"check": self.check, "severity": self.severity, "message": self.message,
                "details": _jsonable(self.details)}


@dataclass(frozen=True)
class ScanLimits:
    max_header_bytes: int = 100 * 2**20       # safetensors JSON header
    max_file_bytes: int = 2 * 2**30           # adapter_model.safetensors
    max_total_bytes: int = 4 * 2**30          # everything hashed in the directory
    max_files: int = 256
    max_depth: int = 4
    max_tensors: int = 20_000
    max_rank: int = 1024
    max_config_bytes: int = 2**20
    max_template_bytes: int = 256 * 2**10
    weights: WeightThresholds = field(default_factory=WeightThresholds)


@dataclass
class AdapterView:
    """What a behaviour probe gets: the vetted adapter, already parsed (never re-read)."""
    path: Path
    config: dict
    factors: dict[tuple[int, str], tuple[np.ndarray, np.ndarray, float]]  # (layer, module) -> (A, B, scale)
    hashes: dict[str, str]


class BehaviourProbe(Protocol):
    """Extension point for the behaviour layer (issue 4 §2): compare base vs base+adapter on
    a probe battery, with and without candidate triggers. Runs only when nothing failed."""

    def __call__(self, adapter: AdapterView, base: BaseModelInfo | None) -> list[Finding]: ...


@dataclass
class ScanReport:
    path: str
    verdict: str
    findings: list[Finding]
    files: dict[str, dict]          # relative path -> {"size", "sha256"[, "symlink_to"]}
    adapter: dict                   # config summary: peft_type, r, alpha, targets, base model, tensors
    weights: dict                   # summary + per-module statistics
    base: str | None
    scanner_version: str = SCANNER_VERSION

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def by_check(self, prefix: str) -> list[Finding]:
        return [f for f in self.findings if f.check == prefix or f.check.startswith(prefix + ".")]

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "path": self.path, "base": self.base,
                "scanner_version": self.scanner_version,
                "counts": {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES},
                "findings": [f.to_dict() for f in self.findings], "files": self.files,
                "adapter": _jsonable(self.adapter), "weights": _jsonable(self.weights)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_text(self) -> str:
        lines = [f"verdict: {self.verdict.upper()}  {self.path}",
                 f"base: {self.base or '(none given)'}"]
        a = self.adapter
        if a:
            lines.append(f"adapter: {a.get('peft_type')} r={a.get('r')} alpha={a.get('lora_alpha')} "
                         f"targets={a.get('target_modules')} base_model={a.get('base_model_name_or_path')!r} "
                         f"tensors={a.get('tensors')} layers={a.get('layers')}")
        for rel, info in sorted(self.files.items()):
            lines.append(f"  file {rel}  {info.get('size')} B  sha256={info.get('sha256') or '-'}")
        w = self.weights.get("summary") or {}
        if w:
            lines.append(f"weights: max {'rel' if w['metric'] == 'rel' else 'abs'} norm {w['max_norm']:.4g} at "
                         f"{w['max_norm_at']}, median {w['median_norm']:.4g}, max layer ratio "
                         f"{w['max_layer_ratio']:.3g}, top layer share {w['top_layer_share']:.0%} "
                         f"(layer {w['top_layer']}), median concentration {w['median_concentration']:.2f}")
        order = {"fail": 0, "warn": 1, "info": 2}
        for f in sorted(self.findings, key=lambda f: order[f.severity]):
            lines.append(f"  [{f.severity.upper():4}] {f.check}: {f.message}")
        return "\n".join(lines)


class _Collector:
    def __init__(self):
        self.findings: list[Finding] = []

    def __call__(self, check: str, severity: str, message: str, **details) -> None:
        assert severity in SEVERITIES, severity
        self.findings.append(Finding(check, severity, message, details))

    def failed(self, prefix: str | None = None) -> bool:
        return any(f.severity == "fail" and (prefix is None or f.check.startswith(prefix)) for f in self.findings)


def scan_adapter(path: str | Path, *, base: BaseModelInfo | None = None, limits: ScanLimits = ScanLimits(),
                 behaviour: BehaviourProbe | Callable | None = None) -> ScanReport:
    """Vet a PEFT LoRA adapter directory. Raises OSError (FileNotFoundError, ...) only when
    the path itself cannot be read; everything about the content is a finding."""
    root = Path(path).expanduser()
    if not root.exists() and not root.is_symlink():
        raise FileNotFoundError(f"no such adapter: {root}")
    mode = root.stat().st_mode  # (follows a symlink: what a loader would read)
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise OSError(errno.EINVAL, "not a regular directory or file (a device, FIFO or socket is never read)",
                      str(root))
    add = _Collector()
    files: dict[str, dict] = {}
    adapter: dict = {}
    weights: dict = {}
    if not root.is_dir():
        _check_file(root, root.name, root.parent, add, files, limits)
        add("artifact.layout", "fail", f"{root} is a file; an adapter is a directory with "
            "adapter_config.json and adapter_model.safetensors")
        return _report(root, add, files, adapter, weights, base)
    entries, truncated = sf.walk(root, max_files=limits.max_files, max_depth=limits.max_depth)
    if truncated:
        add("artifact.size", "fail", f"more than {limits.max_files} entries in the adapter directory")
    total = 0
    for e in entries:
        if e.kind == "special":
            add("artifact.special_file", "fail", f"{e.rel}: not a regular file (device, FIFO or socket)", file=e.rel)
            continue
        if e.kind == "dir":
            add("artifact.extra_file", "warn", f"{e.rel}/: sub-directory inside the adapter (contents scanned)",
                file=e.rel)
            continue
        p = root / e.rel
        if e.kind == "symlink":
            target = p.resolve()
            if not target.is_file():
                add("artifact.symlink", "fail", f"{e.rel}: symlink to {e.target!r}, which is not a regular file",
                    file=e.rel)
                continue
            add("artifact.symlink", "info", f"{e.rel}: symlink to {target} (followed: a regular file)", file=e.rel)
            e.size = target.stat().st_size
        total += e.size
        if total > limits.max_total_bytes:
            add("artifact.size", "fail", f"adapter directory holds more than {limits.max_total_bytes} bytes")
            break
        _check_file(p, e.rel, root, add, files, limits, base=base)
    cfg, spec = _load_config(root, add, limits, base)
    shapes, header = _load_header(root, add, limits)
    if header is not None:
        adapter.update(tensors=len(header.tensors), dtypes=sorted({t.dtype for t in header.tensors.values()}),
                       parameters=int(sum(np.prod(t.shape, dtype=np.int64) for t in header.tensors.values())))
    if cfg is not None:
        adapter.update({k: cfg.get(k) for k in ("peft_type", "r", "lora_alpha", "use_rslora", "target_modules",
                                                "base_model_name_or_path", "task_type")})
    if base is None:
        add("base.missing", "warn", "no base model given: base name, target modules and shapes were not checked")
    pairs = check_tensors(shapes, spec, base, add, max_rank=limits.max_rank) if shapes else {}
    if pairs:
        adapter["layers"] = len({l for l, _ in pairs})
        adapter["ranks"] = sorted({r for _, _, r in pairs.values()})
    factors = {}
    if header is not None and not add.failed("safetensors") and pairs:
        factors = _weights(root, header, pairs, spec, base, add, limits, weights)
    if behaviour is None:
        add("behaviour", "info", "behaviour probes not run (--no-behaviour or not configured): backdoor "
            "triggers are not tested; weight statistics alone catch few backdoors (docs/SECURITY.md)")
    elif add.failed():
        add("behaviour", "info", "behaviour probes skipped: the adapter already failed")
    else:
        view = AdapterView(root, cfg or {}, factors, {k: v["sha256"] for k, v in files.items() if v.get("sha256")})
        for f in behaviour(view, base) or []:
            add.findings.append(f)
    return _report(root, add, files, adapter, weights, base)


def _report(root, add, files, adapter, weights, base) -> ScanReport:
    sev = {f.severity for f in add.findings}
    verdict = "fail" if "fail" in sev else "warn" if "warn" in sev else "pass"
    return ScanReport(str(root), verdict, add.findings, files, adapter, weights, base.name if base else None)


def _check_file(p: Path, rel: str, root: Path, add, files: dict, limits: ScanLimits, base=None) -> None:
    name, suffix = Path(rel).name, Path(rel).suffix.lower()
    try:
        info = {"size": p.stat().st_size, "sha256": sf.sha256_file(p)}
    except OSError as e:
        add("artifact.unreadable", "fail", f"{rel}: cannot be read ({e.strerror or e})", file=rel)
        return
    if p.is_symlink():
        info["symlink_to"] = str(p.resolve())
    files[rel] = info
    why = sf.sniff_pickle(p)
    if suffix in sf.PICKLE_EXTENSIONS or why:
        add("artifact.pickle", "fail", f"{rel}: pickle-capable file ({why or 'extension ' + suffix}); "
            "refused and never unpickled (use safetensors)", file=rel, sha256=info["sha256"])
        return
    if suffix in sf.CODE_EXTENSIONS:
        add("artifact.code", "fail", f"{rel}: executable code inside an adapter", file=rel, sha256=info["sha256"])
        return
    if suffix == ".npy":
        add("artifact.extra_file", "warn", f"{rel}: numpy array file (not part of a PEFT adapter)", file=rel)
        return
    top = "/" not in rel
    if top and name in sf.REQUIRED_FILES:
        return
    if name in sf.TOKENIZER_FILES:
        for check, sev, msg, details in inspect_tokenizer_file(
                p, rel, max_bytes=limits.max_template_bytes, base_template=base.chat_template if base else None):
            add(check, sev, msg, **details)
        return
    if top and name in sf.BENIGN_FILES:
        add("artifact.extra_file", "info", f"{rel}: documentation/report file (ignored)", file=rel)
        return
    kind = "weights file (ignored by Bastion; other loaders may apply it)" \
        if suffix in (".safetensors", ".gguf") else "unexpected file"
    add("artifact.extra_file", "warn", f"{rel}: {kind}", file=rel)


def _load_config(root: Path, add, limits: ScanLimits, base) -> tuple[dict | None, LoraSpec | None]:
    p = root / "adapter_config.json"
    if not p.is_file():
        add("artifact.required_files", "fail", "adapter_config.json is missing")
        return None, None
    if p.stat().st_size > limits.max_config_bytes:
        add("config.size", "fail", f"adapter_config.json is {p.stat().st_size} bytes (limit "
            f"{limits.max_config_bytes})")
        return None, None
    try:
        cfg = sf.strict_json(sf.read_regular(p, limits.max_config_bytes))
    except OSError as e:
        add("config.json", "fail", f"adapter_config.json cannot be read: {e.strerror or e}")
        return None, None
    except (ValueError, UnicodeDecodeError) as e:
        add("config.json", "fail", f"adapter_config.json is not valid JSON: {e}")
        return None, None
    if not isinstance(cfg, dict):
        add("config.json", "fail", "adapter_config.json is not a JSON object")
        return None, None
    return cfg, check_config(cfg, base, add, scale_warn=limits.weights.scale_warn)


def _load_header(root: Path, add, limits: ScanLimits):
    p = root / "adapter_model.safetensors"
    if not p.is_file():
        add("artifact.required_files", "fail", "adapter_model.safetensors is missing"
            + (" (adapter_model.bin is a pickle and is never loaded)" if (root / "adapter_model.bin").exists()
               else ""))
        return {}, None
    size = p.stat().st_size
    if size > limits.max_file_bytes:
        add("artifact.size", "fail", f"adapter_model.safetensors is {size} bytes (limit {limits.max_file_bytes})")
        return {}, None
    try:
        header = sf.parse_safetensors_header(p, max_header_bytes=limits.max_header_bytes,
                                             max_tensors=limits.max_tensors)
    except sf.HeaderError as e:
        add(e.check, "fail", f"adapter_model.safetensors: {e}")
        return {}, None
    for check, msg in header.problems:
        add(check, "fail", msg)
    if not header.tensors:
        add("tensors.empty", "fail", "adapter_model.safetensors holds no tensors")
    return {n: t.shape for n, t in header.tensors.items()}, header


def _weights(root: Path, header, pairs, spec: LoraSpec | None, base, add, limits: ScanLimits,
             weights: dict) -> dict:
    p = root / "adapter_model.safetensors"
    bad: list[str] = []
    stats: list[ModuleStats] = []
    factors = {}
    for (layer, module), (na, nb, rank) in sorted(pairs.items()):
        ta, tb = header.tensors[na], header.tensors[nb]
        if ta.dtype not in sf.SAFETENSORS_DTYPES or tb.dtype not in sf.SAFETENSORS_DTYPES:
            continue
        a, b = sf.read_tensor(p, header, ta), sf.read_tensor(p, header, tb)
        nonfinite = [n for n, x in ((na, a), (nb, b)) if not np.isfinite(x).all()]
        if nonfinite:
            bad += nonfinite
            continue
        path = module_path(layer, module)
        scale = spec.scale_for(path, rank) if spec is not None and spec.alpha is not None else 1.0
        stats.append(module_stats(a, b, scale, layer, module, base.norm(layer, module) if base else None))
        factors[(layer, module)] = (a, b, scale)
    if bad:
        add("weights.nonfinite", "fail", f"{len(bad)} tensor(s) contain NaN/Inf: {', '.join(bad[:3])}",
            tensors=bad[:50])
    if not stats:
        return factors
    zero = [f"layers.{s.layer}.{s.module}" for s in stats if s.fro == 0]
    if zero:
        add("weights.zero", "info", f"{len(zero)} module(s) have a zero update (no effect)", modules=zero[:20])
    summary = summarize(stats)
    weights["summary"] = summary
    weights["thresholds"] = limits.weights.__dict__
    weights["modules"] = [s.to_dict() for s in stats]
    for check, sev, msg, details in judge(stats, summary, limits.weights):
        add(check, sev, msg, **details)
    return factors


def _jsonable(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return _jsonable(float(v))
    return v
