"""Sparse upcycling: a dense Llama/Mistral checkpoint turned into a Mixtral whose E experts
are all copies of each layer's dense MLP, with any router.

Since Mixtral renormalises its top-k weights to sum to 1, every token's MoE output is
sum_k w_k * MLP(x) = MLP(x): the upcycled model's logits equal the dense model's up to
rounding, whatever the router does. That makes it the exactness oracle of the MoE path
(tests/engine/models/test_moe.py) and a model of real proportions for expert-offload
benchmarks (the router decides which copies are touched, so routing skew is the router's).

`upcycle` works on HF-named weight dicts (loader.load_checkpoint's), sharing the dense
tensors rather than copying them; `save_hf_dir` writes the result as an HF directory in
Mixtral's own checkpoint names, which transformers and our loader both read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bastion.engine.models.arch import ModelArch

_MLP = ("gate_proj", "up_proj", "down_proj")
_MIXTRAL_W = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def upcycle(arch: ModelArch, weights: dict, num_experts: int, top_k: int = 2, *, seed: int = 0,
            router_std: float = 1.0, routers: list[torch.Tensor] | None = None) -> tuple[object, dict]:
    """(MixtralConfig, HF-named weights) of the upcycled model. Routers: `routers[i]` [E, H]
    for layer i if given, else N(0, router_std^2 / H) from `seed`. The dense model's tensors
    are shared, not copied (each expert entry is the same tensor). Raises ValueError."""
    from transformers import MixtralConfig

    if arch.model_type not in ("llama", "mistral"):
        raise ValueError(f"upcycling needs a dense Llama or Mistral model, got {arch.model_type!r}")
    if arch.qkv_bias or arch.o_bias:
        raise ValueError("upcycling into Mixtral cannot keep attention biases (Mixtral has none)")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..num_experts ({num_experts}), got {top_k!r}")
    h = arch.hidden_size
    if routers is not None and (len(routers) != arch.num_layers
                                or any(tuple(r.shape) != (num_experts, h) for r in routers)):
        raise ValueError(f"routers: expected {arch.num_layers} tensors of shape [{num_experts}, {h}]")
    src = arch.hf_config
    rope = dict(getattr(src, "rope_parameters", None) or {}) or {"rope_type": "default", "rope_theta": 10000.0}
    cfg = MixtralConfig(
        vocab_size=arch.vocab_size, hidden_size=h, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads, head_dim=arch.head_dim, rms_norm_eps=arch.rms_norm_eps,
        max_position_embeddings=arch.max_position_embeddings, rope_parameters=rope,
        tie_word_embeddings=arch.tie_word_embeddings, sliding_window=arch.sliding_window,
        num_local_experts=num_experts, num_experts_per_tok=top_k,
        bos_token_id=getattr(src, "bos_token_id", None), eos_token_id=getattr(src, "eos_token_id", None),
    )
    gen = torch.Generator().manual_seed(seed)
    out = {k: v for k, v in weights.items() if ".mlp." not in k}
    for i in range(arch.num_layers):
        p = f"model.layers.{i}.mlp."
        dense = {n: weights[p + n + ".weight"] for n in _MLP}
        router = routers[i] if routers is not None else torch.randn(num_experts, h, generator=gen) * (router_std / h**0.5)
        out[p + "gate.weight"] = router.float()
        for e in range(num_experts):
            for n in _MLP:
                out[f"{p}experts.{e}.{n}.weight"] = dense[n]
    return cfg, out


def save_hf_dir(path: str | Path, config, weights: dict, dtype: torch.dtype = torch.float32) -> Path:
    """Write an upcycled model (upcycle's output) as an HF directory: config.json and one
    safetensors shard per layer (plus one for the rest) with an index, in Mixtral's
    checkpoint names (block_sparse_moe.experts.E.w1/w2/w3). Quantized weights are written
    dequantized. One layer's tensors are materialised at a time."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(path))
    n = config.num_hidden_layers
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, w in weights.items():
        parts = name.split(".")
        key = f"layer{parts[2]}" if name.startswith("model.layers.") else "rest"
        shards.setdefault(key, {})[name] = w
    order = [f"layer{i}" for i in range(n) if f"layer{i}" in shards] + (["rest"] if "rest" in shards else [])
    index = {}
    for j, key in enumerate(order):
        fname = f"model-{j + 1:05d}-of-{len(order):05d}.safetensors"
        tensors = {}
        for name, w in shards[key].items():
            w = w.dequantize() if hasattr(w, "dequantize") else w
            # NOTE: experts share one tensor in memory; safetensors wants each stored on its own
            tensors[_mixtral_name(name)] = w.detach().to(dtype).contiguous().clone()
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        index.update({k: fname for k in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    return path


def _mixtral_name(name: str) -> str:
    if ".mlp." not in name:
        return name
    head, tail = name.split(".mlp.", 1)
    if tail.startswith("experts."):
        _, e, proj, rest = tail.split(".", 3)
        return f"{head}.block_sparse_moe.experts.{e}.{_MIXTRAL_W[proj]}.{rest}"
    return f"{head}.block_sparse_moe.{tail}"


def save_gguf(path: str | Path, config, weights: dict, expert_type: str = "Q8_0") -> Path:
    """Write an upcycled model as llama.cpp stores a Mixtral: GGUF arch "llama" with
    expert_count, q/k rows permuted to llama.cpp's interleaved RoPE order, experts stacked
    [E, N, K] per layer in `expert_type` (gguf-py's quantizer: Q8_0, Q4_0, Q4_1; what
    --moe-memory offloads through the weight path), everything else F32. No tokenizer
    metadata: the model's tokenizer is the embedded SmolLM2's."""
    import gguf
    import numpy as np

    from bastion.engine.models.loader import gguf_tensor_name, permute_for_gguf

    qt = gguf.GGMLQuantizationType[expert_type]
    c = config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float((getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    w.add_vocab_size(c.vocab_size)
    w.add_expert_count(c.num_local_experts)
    w.add_expert_used_count(c.num_experts_per_tok)

    def f32(t) -> np.ndarray:
        t = t.dequantize() if hasattr(t, "dequantize") else t
        return t.detach().float().contiguous().numpy()

    heads = {"self_attn.q_proj.weight": c.num_attention_heads, "self_attn.k_proj.weight": c.num_key_value_heads}
    for name, t in weights.items():
        if ".mlp.experts." in name or (name == "lm_head.weight" and c.tie_word_embeddings):
            continue
        a = f32(t)
        n_heads = heads.get(name.split(".", 3)[-1]) if name.startswith("model.layers.") else None
        w.add_tensor(gguf_tensor_name(name), permute_for_gguf(a, n_heads) if n_heads else a)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts."
        for proj, g in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
            stacked = np.stack([f32(weights[f"{p}{e}.{proj}.weight"]) for e in range(c.num_local_experts)])
            w.add_tensor(f"blk.{i}.{g}.weight", gguf.quants.quantize(stacked, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
