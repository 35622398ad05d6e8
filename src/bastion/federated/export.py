"""Write the global adapter in PEFT format and the JSON training report.

adapter_config.json + adapter_model.safetensors load with
`PeftModel.from_pretrained(base, ADAPTER_DIR)` onto the HF SmolLM2 model; tensor keys are
PEFT's (base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight, ...).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from bastion.federated.lora_math import Factors, modules_of
from bastion.federated.modeling import BASE_NAME


def write_adapter(out_dir: str | Path, factors: Factors, *, rank: int, alpha: float,
                  targets: tuple[str, ...], layers: list[int] | None = None) -> Path:
    """factors: A [rank, in] / B [out, rank] per module; PEFT applies (alpha/rank) B A.
    layers: decoder layers that carry LoRA (PEFT layers_to_transform); None = all."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for m in modules_of(factors):
        a, b = factors[f"{m}.lora_A.weight"], factors[f"{m}.lora_B.weight"]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"{m}: factor ranks {a.shape[0]}/{b.shape[1]} != declared rank {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(targets), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=BASE_NAME,
                        layers_to_transform=layers)
    config.save_pretrained(str(out))
    save_file({k: v.detach().float().contiguous() for k, v in factors.items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def _clean(value):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    return value


def write_report(path: str | Path, report: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(report), indent=2) + "\n")
    return path
