"""PEFT LoRA adapter directories for the embedded model (SmolLM2-135M-Instruct), written
without loading the model: random small factors on q_proj/v_proj of every layer, a
config naming the embedded base, so the vetting gate passes them."""

from __future__ import annotations

import json
from pathlib import Path

# SmolLM2-135M-Instruct: 30 layers, hidden 576, 9 query heads and 3 KV heads of 64
SMOLLM2 = {"layers": 30, "hidden": 576, "q_out": 576, "v_out": 192}


def write_smollm2_adapter(path: Path, rank: int = 4, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(SMOLLM2["layers"]):
        for mod, out in (("q_proj", SMOLLM2["q_out"]), ("v_proj", SMOLLM2["v_out"])):
            pre = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            tensors[f"{pre}.lora_A.weight"] = torch.randn(rank, SMOLLM2["hidden"], generator=g) * 0.1
            tensors[f"{pre}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.005
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    return path
