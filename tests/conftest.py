"""Session fixtures shared by the whole suite: the real embedded model, loaded once.

Threads: CI machines have 2 cores; torch's default already matches that.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def real_engine():
    """AsyncEngine on SmolLM2-135M-Instruct (dtype auto, the served default), one per session."""
    import asyncio

    from bastion.config import CacheConfig, Config, ModelConfig, SchedulerConfig
    from bastion.serving.async_engine import AsyncEngine

    engine = AsyncEngine.from_config(
        Config(model=ModelConfig(max_model_len=2048), cache=CacheConfig(num_blocks=512),
               scheduler=SchedulerConfig(max_num_seqs=32, max_waiting=64)),
        show_progress=False,
    )
    yield engine
    asyncio.run(engine.shutdown(grace_s=0))


@pytest.fixture(scope="session")
def offline_llm():
    """Offline LLM (separate engine instance) for engine-level tests on the real model."""
    from bastion.config import CacheConfig, Config, ModelConfig
    from bastion.serving.llm import LLM

    return LLM(Config(model=ModelConfig(max_model_len=2048), cache=CacheConfig(num_blocks=256)), show_progress=False)


@pytest.fixture
def tiny_llm_engine():
    """A factory of LLMEngines around a tiny random Llama (vocab 512, 1 layer, fp32, fp KV
    pool): for tests about plumbing and failure paths, where the weights do not matter."""
    import torch
    from transformers import LlamaConfig

    from bastion.config import CacheConfig, Config
    from bastion.engine.kv_cache.fp import FPKVCache
    from bastion.engine.llm_engine import LLMEngine
    from bastion.engine.models.arch import ModelArch
    from bastion.engine.models.llama import LlamaForCausalLM

    def build(*, num_blocks: int = 64, eos_token_id: int | None = None) -> LLMEngine:
        arch = ModelArch.from_hf_config(LlamaConfig(
            vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False))
        torch.manual_seed(0)
        model = LlamaForCausalLM(arch, arch.max_position_embeddings).eval()
        kv = FPKVCache(num_layers=1, num_kv_heads=1, head_dim=16, num_blocks=num_blocks, block_size=16,
                       dtype=torch.float32, device=torch.device("cpu"))
        return LLMEngine(Config(cache=CacheConfig(num_blocks=num_blocks)), model, kv, vocab_size=512,
                         eos_token_id=eos_token_id, max_model_len=512)

    return build


@pytest.fixture(scope="session")
def tokenizer():
    from bastion.engine.models.loader import embedded_model_path
    from bastion.serving.tokenizer import load_tokenizer

    return load_tokenizer(embedded_model_path())
