"""Model architecture description, read from an HF config (config.json or GGUF metadata).

We keep the HF `PretrainedConfig` as the source of truth for hyper-parameters and RoPE
scaling (so `transformers`' RoPE initialisers apply unchanged), and reduce it to the
few numbers our forward pass needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# model_type -> does q/k/v projection carry a bias
SUPPORTED_ARCHS = {"llama": False, "mistral": False, "qwen2": True}
SUPPORTED_ROPE = ("default", "linear", "dynamic", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model this engine cannot run; the message says what."""


@dataclass(frozen=True)
class ModelArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool  # Llama's attention_bias also biases o_proj (Qwen2's q/k/v bias does not)
    sliding_window: int | None
    hf_config: Any  # transformers.PretrainedConfig (RoPE parameters live here)

    @classmethod
    def from_hf_config(cls, cfg: Any) -> "ModelArch":
        mt = getattr(cfg, "model_type", None)
        if mt not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
            )
        rope = _rope_type(cfg)
        if rope not in SUPPORTED_ROPE:
            raise UnsupportedModelError(f"RoPE scaling type {rope!r} is not supported ({SUPPORTED_ROPE})")
        if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
            raise UnsupportedModelError(f"activation {cfg.hidden_act!r} is not supported (SwiGLU/silu only)")
        if getattr(cfg, "mlp_bias", False):
            raise UnsupportedModelError("mlp_bias=True (biased gate/up/down projections) is not supported")
        num_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        return cls(
            model_type=mt,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=SUPPORTED_ARCHS[mt] or bool(getattr(cfg, "attention_bias", False)),
            o_bias=mt != "qwen2" and bool(getattr(cfg, "attention_bias", False)),
            sliding_window=window,
            hf_config=cfg,
        )

    def max_context(self) -> int:
        """Longest context we attend over exactly. NOTE: sliding-window attention is not
        implemented, so a windowed model is capped at its window (full attention inside)."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings


def _rope_type(cfg: Any) -> str:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) or "default"
