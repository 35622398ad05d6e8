"""The model's tokenizer (with its chat template) and the engine built beside it.

The engine takes token ids only; the tokenizer is loaded here, from the same file or
directory as the weights, and hands the engine its end-of-sequence id."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from bastion.config import Config
from bastion.engine.builder import build_engine
from bastion.engine.llm_engine import LLMEngine
from bastion.engine.models.arch import UnsupportedModelError
from bastion.engine.models.loader import resolve_model_path


def load_engine(config: Config, show_progress: bool = True) -> tuple[LLMEngine, Any, str]:
    """(engine, tokenizer, model name) for config.model."""
    path, _ = resolve_model_path(config.model.path)
    tokenizer = load_tokenizer(path)
    engine, name = build_engine(config, eos_token_id=tokenizer.eos_token_id, show_progress=show_progress)
    return engine, tokenizer, name


def _cache_dir() -> Path:
    return Path(os.environ.get("BASTION_CACHE", Path.home() / ".cache" / "bastion"))


def load_tokenizer(path: Path):
    """HF tokenizer with its chat template. GGUF tokenizers are converted once (slow,
    ~10 s) and cached as tokenizer.json under $BASTION_CACHE keyed by the file's identity."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if path.is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise UnsupportedModelError(
                f"{path}: no usable tokenizer (expected tokenizer.json or tokenizer_config.json + vocab files): {e}"
            ) from e
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = _cache_dir() / "tokenizers" / key
    if (cached / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
        except (OSError, ValueError, json.JSONDecodeError):
            pass  # a damaged cache entry is rebuilt below
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    try:
        tok.save_pretrained(str(cached))
    except OSError:
        pass  # read-only home: fine, just slower next time
    return tok
