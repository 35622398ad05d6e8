"""Compact Llama-family decoder (Llama 2/3, SmolLM2, Qwen2/2.5, Mistral) and the
mixtures of experts built on it (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: moe.py).

RMSNorm, RoPE (HF rotate-half layout, with transformers' scaling initialisers), GQA,
SwiGLU, optional q/k/v bias (Qwen2), q/k RMSNorm per head (Qwen3) or over the whole
projection (OLMoE, with its q/k/v clamp), tied embeddings. Works on a flat batch of tokens
from many sequences: attention goes through the KV cache object, which owns the paged
memory layout, so this file never sees blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from bastion.engine.kv_cache.base import AttentionMetadata, KVCache
from bastion.engine.models.arch import ModelArch
from bastion.engine.models.layer_ops import LayerOps
from bastion.engine.models.linear import Linear
from bastion.engine.models.moe import MoEMLP


def rope_tables(arch: ModelArch, max_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_len, head_dim] fp32, including the scaling type's attention factor."""
    cfg = arch.hf_config
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        dim = arch.head_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
        scale = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        hf = cfg.to_transformers() if hasattr(cfg, "to_transformers") else cfg  # a GGUF's light config
        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
        inv_freq = inv_freq.double()
    t = torch.arange(max_len, dtype=torch.float64, device="cpu")  # NOTE: explicit: models may be built on meta
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * scale).float().to(device), (emb.sin() * scale).float().to(device)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int):
        super().__init__()
        h, d = arch.hidden_size, arch.head_dim
        self.layer_idx = layer_idx
        self.eps = arch.rms_norm_eps
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, d
        self.q_size, self.kv_size = arch.num_heads * d, arch.num_kv_heads * d
        self.input_layernorm = nn.Parameter(torch.ones(h), requires_grad=False)
        self.post_attention_layernorm = nn.Parameter(torch.ones(h), requires_grad=False)
        # NOTE: q, k, v and gate, up are fused so each is one GEMM (fewer ops per step).
        self.qkv_proj = Linear(h, self.q_size + 2 * self.kv_size, bias=arch.qkv_bias)
        self.o_proj = Linear(self.q_size, h, bias=arch.o_bias)
        self.qk_norm, self.clip_qkv = arch.qk_norm, arch.clip_qkv
        if arch.qk_norm != "none":
            full = arch.qk_norm == "full"
            self.q_norm = nn.Parameter(torch.ones(self.q_size if full else d), requires_grad=False)
            self.k_norm = nn.Parameter(torch.ones(self.kv_size if full else d), requires_grad=False)
        # an MoE layer has experts (self.mlp) instead of the dense gate_up/down projections
        self.mlp = MoEMLP(arch) if arch.is_moe_layer(layer_idx) else None
        if self.mlp is None:
            self.gate_up_proj = Linear(h, 2 * arch.intermediate_size, bias=False)
            self.down_proj = Linear(arch.intermediate_size, h, bias=False)

    def forward(self, x, cos, sin, meta: AttentionMetadata, kv: KVCache, ops: LayerOps) -> torch.Tensor:
        # x: [T, hidden], the residual stream (updated in place); cos/sin: [T, D]
        t = x.shape[0]
        h = ops.rms_norm(x, self.input_layernorm, self.eps)
        qkv = self.qkv_proj(h)
        if self.qk_norm != "none" or self.clip_qkv is not None:
            self._norm_clip_qkv(qkv, ops)
        q, k, v = ops.rope_qk(qkv, cos, sin, self.num_heads, self.num_kv_heads, self.head_dim)
        kv.write(self.layer_idx, k, v, meta)
        attn = kv.attend(self.layer_idx, q, meta)  # [T, heads, D]
        h = ops.add_rms_norm_(x, self.o_proj(attn.reshape(t, self.q_size)), self.post_attention_layernorm, self.eps)
        if self.mlp is not None:
            return x.add_(self.mlp(h))
        return x.add_(self.down_proj(ops.silu_mul(self.gate_up_proj(h))))

    def _norm_clip_qkv(self, qkv: torch.Tensor, ops: LayerOps) -> None:
        """In place on qkv [T, q + 2 kv] (a fresh projection output): q and k RMSNormed, per
        head or whole; then q, k, v clamped to +-clip_qkv (OLMoE's order)."""
        if self.qk_norm != "none":
            t, nq, nk = qkv.shape[0], self.q_size, self.kv_size
            for lo, n, w in ((0, nq, self.q_norm), (nq, nk, self.k_norm)):
                part = qkv[:, lo:lo + n].reshape(-1, w.shape[0]).contiguous()
                qkv[:, lo:lo + n] = ops.rms_norm(part, w, self.eps).view(t, n)
        if self.clip_qkv is not None:
            qkv.clamp_(-self.clip_qkv, self.clip_qkv)


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: ModelArch, max_len: int):
        super().__init__()
        self.arch = arch
        # NOTE: zeros handed in, not nn.Embedding's normal_ init: weights are loaded after, and
        # under torch.device("meta") normal_ goes through torch._refs, importing dynamo and sympy
        # (+40 MB resident for nothing).
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size,
                                         _weight=torch.zeros(arch.vocab_size, arch.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(arch, i) for i in range(arch.num_layers))
        self.norm = nn.Parameter(torch.ones(arch.hidden_size), requires_grad=False)
        # lm_head shares the embedding matrix when tied (SmolLM2); see load_hf_state_dict.
        self.lm_head = Linear(arch.hidden_size, arch.vocab_size, bias=False)
        cos, sin = rope_tables(arch, max_len, torch.device("cpu"))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.ops = LayerOps()  # torch ops; the builder hands in the native module where it runs
        self.fused_decode = None  # decode steps in one native call (fused_decode.py), set by the builder

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv: KVCache):
        # input_ids, positions: [T]  ->  hidden: [T, hidden] (final-normed)
        x = self.embed_tokens(input_ids)  # NOTE: a fresh tensor: the layers update it in place
        cos = self.rope_cos[positions].to(x.dtype)  # [T, D]
        sin = self.rope_sin[positions].to(x.dtype)
        if self.fused_decode is None or not self.fused_decode.run(x, cos, sin, meta, kv):
            for layer in self.layers:
                x = layer(x, cos, sin, meta, kv, self.ops)
        return self.ops.rms_norm(x, self.norm, self.arch.rms_norm_eps)

    def enable_fp16_gemv(self) -> None:
        """Keep fp16 copies of every projection for single-row GEMVs (see linear.py)."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.enable_fp16_gemv()

    def enable_packed_gemm(self) -> None:
        """Keep oneDNN-prepacked copies of every bf16 projection (see linear.py)."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.enable_packed_gemm()

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] -> logits [N, vocab] in fp32 (sampling and logprobs want fp32)
        return self.lm_head(hidden).float()

    def load_hf_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        """Load HF-named tensors (model.layers.N.self_attn.q_proj.weight, ...), fusing
        q/k/v and gate/up. Raises UnsupportedModelError naming any missing tensor."""
        from bastion.engine.models.arch import UnsupportedModelError

        def take(name: str) -> torch.Tensor:
            if name not in weights:
                raise UnsupportedModelError(f"checkpoint is missing tensor {name!r}")
            w = weights[name]  # a QuantWeight here has a dense neighbour in its fused module
            return w.dequantize() if hasattr(w, "dequantize") else w

        dense = (lambda m: isinstance(m, (nn.Embedding, Linear)))  # NOTE: swapped (quantized) modules came loaded
        with torch.no_grad():
            if dense(self.embed_tokens):
                self.embed_tokens.weight.copy_(take("model.embed_tokens.weight"))
            self.norm.copy_(take("model.norm.weight"))
            if dense(self.lm_head):
                if self.arch.tie_word_embeddings:
                    self.lm_head.weight = self.embed_tokens.weight
                else:
                    self.lm_head.weight.copy_(take("lm_head.weight"))
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{i}."
                layer.input_layernorm.copy_(take(p + "input_layernorm.weight"))
                layer.post_attention_layernorm.copy_(take(p + "post_attention_layernorm.weight"))
                if dense(layer.qkv_proj):
                    layer.qkv_proj.weight.copy_(torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"], 0))
                    if layer.qkv_proj.bias is not None:
                        layer.qkv_proj.bias.copy_(torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"]))
                if dense(layer.o_proj):
                    layer.o_proj.weight.copy_(take(p + "self_attn.o_proj.weight"))
                    if layer.o_proj.bias is not None:
                        layer.o_proj.bias.copy_(take(p + "self_attn.o_proj.bias"))
                if layer.qk_norm != "none":
                    layer.q_norm.copy_(take(p + "self_attn.q_norm.weight"))
                    layer.k_norm.copy_(take(p + "self_attn.k_norm.weight"))
                if layer.mlp is not None:
                    layer.mlp.load(weights, take, p + "mlp.")
                    continue
                if dense(layer.gate_up_proj):
                    layer.gate_up_proj.weight.copy_(torch.cat([take(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")], 0))
                if dense(layer.down_proj):
                    layer.down_proj.weight.copy_(take(p + "mlp.down_proj.weight"))
