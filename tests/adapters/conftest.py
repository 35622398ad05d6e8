"""Adapter-scanner fixtures: one real PEFT adapter of a tiny random Llama per test module
(real `save_pretrained`), and a fresh copy of it for each test to mutate."""

from __future__ import annotations

import shutil

import pytest

from bastion.adapters.scanner import BaseModelInfo
from bastion.engine.models.arch import ModelArch

from tests.adapters._scanner_util import ALL, LAYERS, _tiny_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(clean adapter dir, BaseModelInfo with weight norms, HF base dir) for a tiny random Llama."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_config())
    root = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(str(root / "tiny-llama"))
    norms = {(i, n.split(".")[-2]): float(p.detach().double().norm()) for n, p in model.named_parameters()
             for i in range(LAYERS) if f"layers.{i}." in n and n.split(".")[-2] in ALL}
    model.name_or_path = "tiny-llama"
    model.config._name_or_path = "tiny-llama"
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL, task_type="CAUSAL_LM"))
    with torch.no_grad():  # a "trained" adapter: small non-zero B, similar size in every layer
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 2e-3)
    peft_model.save_pretrained(str(root / "clean"))
    base = BaseModelInfo.from_arch(ModelArch.from_hf_config(_tiny_config()), "tiny-llama", weight_norms=norms)
    return root / "clean", base, root / "tiny-llama"


@pytest.fixture
def adapter(tiny, tmp_path):
    d = tmp_path / "adapter"
    shutil.copytree(tiny[0], d)
    return d
