"""Model architecture description, read from an HF config (config.json or GGUF metadata).

We keep the HF `PretrainedConfig` as the source of truth for hyper-parameters and RoPE
scaling (so `transformers`' RoPE initialisers apply unchanged), and reduce it to the
few numbers our forward pass needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")  # mixtures of experts (moe.py)
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
    hf_config: Any  # transformers.PretrainedConfig, or a GGUF's GGUFModelConfig (RoPE parameters live here)
    # q/k normalisation before RoPE: "head" = RMSNorm over each head's D (Qwen3), "full" = over
    # the whole q / k projection (OLMoE); clip_qkv clamps q, k, v after it (OLMoE)
    qk_norm: str = "none"
    clip_qkv: float | None = None
    # mixture of experts (num_experts 0: dense); intermediate_size stays the dense layers' width
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the top-k probabilities to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: a dense expert every token takes, sigmoid-gated
    moe_layers: tuple[int, ...] = ()

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
        if mt == "olmoe" and head_dim * num_heads != cfg.hidden_size:
            raise UnsupportedModelError("OLMoE with head_dim * heads != hidden_size is not supported")
        bias = bool(getattr(cfg, "attention_bias", False))
        qkv_bias = {"qwen2": True, "qwen2_moe": bool(getattr(cfg, "qkv_bias", False)), "mixtral": False}.get(mt, bias)
        o_bias = mt not in ("qwen2", "qwen2_moe", "mixtral") and bias
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
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            sliding_window=window,
            hf_config=cfg,
            qk_norm={"qwen3_moe": "head", "olmoe": "full"}.get(mt, "none"),
            clip_qkv=getattr(cfg, "clip_qkv", None) if mt == "olmoe" else None,
            **(_moe_fields(cfg, mt) if mt in MOE_ARCHS else {}),
        )

    def is_moe_layer(self, i: int) -> bool:
        return i in self.moe_layers

    @property
    def plain_layers(self) -> bool:
        """Every layer is the dense Llama layer (what the native whole-step decode plan runs)."""
        return not self.moe_layers and self.qk_norm == "none" and self.clip_qkv is None

    def max_context(self) -> int:
        """Longest context we attend over exactly. NOTE: sliding-window attention is not
        implemented, so a windowed model is capped at its window (full attention inside)."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings


def _moe_fields(cfg: Any, mt: str) -> dict:
    """The expert hyper-parameters, checked (raises UnsupportedModelError / ValueError)."""
    n = getattr(cfg, "num_local_experts", None) if mt == "mixtral" else getattr(cfg, "num_experts", None)
    k = getattr(cfg, "num_experts_per_tok", None)
    if not isinstance(n, int) or not isinstance(k, int) or n < 1 or not 1 <= k <= n:
        raise ValueError(f"{mt}: need 1 <= num_experts_per_tok <= num_experts, got {k} of {n}")
    width = cfg.intermediate_size if mt in ("mixtral", "olmoe") else cfg.moe_intermediate_size
    if mt in ("qwen2_moe", "qwen3_moe"):
        step, dense = getattr(cfg, "decoder_sparse_step", 1), set(getattr(cfg, "mlp_only_layers", None) or ())
        if not isinstance(step, int) or step < 1:
            raise ValueError(f"{mt}: decoder_sparse_step must be a positive integer, got {step!r}")
        layers = tuple(i for i in range(cfg.num_hidden_layers) if i not in dense and (i + 1) % step == 0)
    else:
        layers = tuple(range(cfg.num_hidden_layers))
    return dict(
        num_experts=n, num_experts_per_tok=k, moe_intermediate_size=width,
        # Mixtral always renormalises the top-k; the others as the config says
        norm_topk_prob=True if mt == "mixtral" else bool(getattr(cfg, "norm_topk_prob", False)),
        shared_expert_intermediate_size=(cfg.shared_expert_intermediate_size if mt == "qwen2_moe" else 0),
        moe_layers=layers,
    )


def _rope_type(cfg: Any) -> str:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) or "default"
