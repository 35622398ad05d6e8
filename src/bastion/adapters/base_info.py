"""The served base model as the vetting gate sees it: its name and the names that mean the
same weights (hub ids, local paths, quantized GGUF file names), its module shapes, and
optionally its per-module weight norms (for the weight checks' relative ΔW)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np


# Served name -> public hub ids of the same weights (lowercase prefix -> namespace).
_HUB_NAMESPACES = {"smollm2-": "HuggingFaceTB", "smollm-": "HuggingFaceTB", "qwen2": "Qwen",
                   "mistral-": "mistralai", "llama-3": "meta-llama", "meta-llama-": "meta-llama"}
_QUANT_SUFFIX = re.compile(r"[.-](q\d[\w]*|iq\d[\w]*|f16|f32|bf16|fp16|fp32)$", re.I)


@dataclass(frozen=True)
class BaseModelInfo:
    """What the gate needs to know about the served base model."""
    name: str
    aliases: tuple[str, ...]
    num_layers: int
    hidden_size: int
    vocab_size: int
    module_shapes: tuple[tuple[str, int, int], ...]        # (module, in_features, out_features)
    weight_norms: tuple[tuple[int, str, float], ...] = ()  # (layer, module, ‖W‖_F), optional
    chat_template: str | None = None

    @classmethod
    def from_arch(cls, arch: Any, name: str, *, aliases: tuple[str, ...] = (),
                  weight_norms: Mapping[tuple[int, str], float] | None = None,
                  chat_template: str | None = None) -> "BaseModelInfo":
        """From bastion.engine.models.arch.ModelArch (or anything with its fields)."""
        h, q, kv = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        inter = arch.intermediate_size
        shapes = (("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
                  ("gate_proj", h, inter), ("up_proj", h, inter), ("down_proj", inter, h))
        norms = tuple(sorted((int(l), str(m), float(v)) for (l, m), v in (weight_norms or {}).items()))
        return cls(name=name, aliases=name_aliases(name, aliases), num_layers=arch.num_layers, hidden_size=h,
                   vocab_size=arch.vocab_size, module_shapes=shapes, weight_norms=norms, chat_template=chat_template)

    def with_weight_norms(self, norms: Mapping[tuple[int, str], float]) -> "BaseModelInfo":
        from dataclasses import replace

        return replace(self, weight_norms=tuple(sorted((int(l), str(m), float(v)) for (l, m), v in norms.items())))

    def shape(self, module: str) -> tuple[int, int] | None:
        for m, i, o in self.module_shapes:
            if m == module:
                return i, o
        return None

    def norm(self, layer: int, module: str) -> float | None:
        for l, m, v in self.weight_norms:
            if l == layer and m == module:
                return v
        return None

    def match_name(self, value: str) -> str | None:
        """'exact' (an alias), 'path' (a local path ending in an alias), 'namespace' (an
        alias's name under another hub namespace) or None (a different model)."""
        v = value.strip().rstrip("/\\")
        lowered = {a.lower() for a in self.aliases}
        if v.lower() in lowered:
            return "exact"
        last = _strip_model_suffix(re.split(r"[/\\]", v)[-1]).lower()
        bare = {_strip_model_suffix(a.split("/")[-1]).lower() for a in self.aliases if not _is_path(a)}
        if last not in bare:
            return None
        looks_local = v.startswith(("/", "./", "../", "~", "\\")) or bool(re.match(r"^[A-Za-z]:[\\/]", v)) \
            or len(re.split(r"[/\\]", v)) > 2
        return "path" if looks_local else "namespace"


_HF_LINEAR = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|"
                        r"down_proj)\.weight$")


def hf_weight_norms(weights: Mapping[str, Any]) -> dict[tuple[int, str], float]:
    """‖W‖_F per (layer, module) from HF-named base weights (torch tensors or numpy
    arrays), e.g. LoadedCheckpoint.weights, for relative ΔW thresholds."""
    out = {}
    for name, w in weights.items():
        m = _HF_LINEAR.match(name)
        if m:
            v = w.detach().double().norm() if hasattr(w, "detach") else np.linalg.norm(np.asarray(w, np.float64))
            out[(int(m.group(1)), m.group(2))] = float(v)
    return out


def name_aliases(name: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The served name, its GGUF-file variants and its public hub id (when known).
    A filesystem path is kept whole; only a .gguf path also gives its file-name variants
    (a directory's basename alone, e.g. "models", would accept far too much)."""
    out: list[str] = []
    for n in (name, *extra):
        n = str(n).rstrip("/\\") or str(n)
        if _is_path(n) and not n.lower().endswith(".gguf"):
            cands = [n]
        else:
            base = re.split(r"[/\\]", n)[-1]
            cands = [n, base, base.removesuffix(".gguf"), _strip_model_suffix(base)]
        for cand in cands:
            if cand and cand not in out:
                out.append(cand)
        stem = _strip_model_suffix(re.split(r"[/\\]", n)[-1])
        for prefix, ns in _HUB_NAMESPACES.items():
            if stem.lower().startswith(prefix) and f"{ns}/{stem}" not in out:
                out.append(f"{ns}/{stem}")
    return tuple(out)


def _is_path(s: str) -> bool:
    return s.startswith(("/", "~", ".", "\\")) or bool(re.match(r"^[A-Za-z]:[\\/]", s))


def _strip_model_suffix(s: str) -> str:
    s = s.removesuffix(".gguf")
    return _QUANT_SUFFIX.sub("", s)
