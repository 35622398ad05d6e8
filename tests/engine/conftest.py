"""Engine-suite fixtures. The fp32 SmolLM2 (our loader) and the HF fp32 oracle logits are
loaded once per session; the bf16 `offline_llm` comes from tests/conftest.py."""

from __future__ import annotations

import pytest
import torch

from tests.support.engines import build_model, tiny_llama_config

from tests.support.text import gpl_text


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread():
    """One intra-op thread for this package. Measured on the shared 2-core machine under
    load: a SmolLM2 decode step takes ~0.15 s with 1 thread and 0.6-4.8 s with 2 (OpenMP
    threads fighting other processes for the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def gpl_ids(tokenizer) -> list[int]:
    """64 tokens of real English text (GPL-3 preamble)."""
    ids = tokenizer.encode(gpl_text())
    assert len(ids) >= 64
    return ids[:64]


@pytest.fixture(scope="session")
def smol_ckpt():
    from bastion.engine.models.loader import load_checkpoint

    return load_checkpoint(None, show_progress=False)


@pytest.fixture(scope="session")
def smol_fp32(smol_ckpt):
    """Our SmolLM2 model in fp32 (weights dequantized by our GGUF loader)."""
    return build_model(smol_ckpt, torch.float32, max_len=2048)


@pytest.fixture(scope="session")
def hf_smol_logits(gpl_ids) -> torch.Tensor:
    """HF transformers' fp32 logits [64, V] for gpl_ids, loading the same GGUF with its own
    dequantizer. The HF model is dropped afterwards (memory)."""
    from transformers import AutoModelForCausalLM

    from bastion.engine.models.loader import embedded_model_path

    p = embedded_model_path()
    hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([gpl_ids])).logits[0].float()
    del hf
    return logits


@pytest.fixture(scope="module")
def hf_base():
    """A tiny random HF Llama: the base of the LoRA and track tests (PEFT is their oracle)."""
    from transformers import LlamaForCausalLM as HFLlama

    torch.manual_seed(0)
    return HFLlama(tiny_llama_config()).eval()
