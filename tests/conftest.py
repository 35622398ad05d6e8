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
    from bastion.engine.async_engine import AsyncEngine

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
    from bastion.engine.llm import LLM

    return LLM(Config(model=ModelConfig(max_model_len=2048), cache=CacheConfig(num_blocks=256)), show_progress=False)
