"""A tiny random Mixtral saved as an HF directory: the offload tests' and the offload
bounds bench's model (3 MoE layers, 8 experts, top-2)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.support.engines import randomize

TINY_MIXTRAL_VOCAB = 256


def save_tiny_mixtral(path: Path) -> Path:
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(vocab_size=TINY_MIXTRAL_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    randomize(hf, 3)
    hf.save_pretrained(str(path))
    return path
