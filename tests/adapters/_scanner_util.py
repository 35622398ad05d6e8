"""Helpers shared by the adapter-scanner tests (test_scanner.py, test_scanner_config_weights.py):
the tiny random Llama's shape, scanning against its BaseModelInfo, the refusal assertion,
and reading/rewriting an adapter's config and safetensors file (parsed or raw bytes).
The PEFT adapter fixtures built from it are in conftest.py.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from bastion.adapters.scanner import scan_adapter

LAYERS, HIDDEN, INTER = 8, 32, 64
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model.model.layers"


def _tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


# ---------------------------------------------------------------- helpers
def _scan(d, tiny, **kw):
    return scan_adapter(d, base=tiny[1], **kw)


def _assert_refused(report, check, severity="fail", text=None, verdict=None):
    """The report's verdict is `verdict` (default: severity) and a `severity` finding of
    `check` (optionally containing `text`) says why."""
    hits = [f for f in report.by_check(check) if f.severity == severity]
    assert report.verdict == (verdict or severity), report.to_text()
    assert hits, f"no {severity} finding {check!r}:\n{report.to_text()}"
    if text:
        assert any(text in f.message for f in hits), report.to_text()
    return hits


def _edit_config(d: Path, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _tensors(d: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(d / "adapter_model.safetensors"))


def _save(d: Path, tensors: dict[str, np.ndarray]):
    from safetensors.numpy import save_file

    save_file(tensors, str(d / "adapter_model.safetensors"))


def _raw(d: Path) -> tuple[dict, bytes]:
    b = (d / "adapter_model.safetensors").read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), b[8 + n:]


def _write_raw(d: Path, header: dict, data: bytes):
    h = json.dumps(header).encode()
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + data)
