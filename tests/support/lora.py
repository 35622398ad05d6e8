"""LoRA test helpers: PEFT adapters made on a tiny HF Llama (random non-zero B, so a wrong
slice or scale shows) and our engine on the same weights with adapter slots."""

from __future__ import annotations

import torch

from bastion.config import AdapterConfig
from bastion.engine.models.arch import ModelArch
from bastion.engine.models.llama import LlamaForCausalLM
from tests.support.engines import make_engine

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_adapter(hf_base, tmp_path, name, seed, **cfg):
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(hf_base), LoraConfig(init_lora_weights=False, **cfg))
    with torch.no_grad():  # larger deltas than PEFT's init, so mistakes are visible
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    path = tmp_path / name
    model.save_pretrained(str(path))
    return model.eval(), path


def engine_on(hf_base, num_blocks=64, prefix_caching=True, kivi: bool = False):
    """Our engine on hf_base's weights with 4 adapter slots (fp KV pool, or a K4V2 KIVI
    pool with G = R = 8 and 4 sequence slots)."""
    arch = ModelArch.from_hf_config(hf_base.config)
    model = LlamaForCausalLM(arch, 256)
    model.load_hf_state_dict(hf_base.state_dict())
    model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()
    if kivi:
        from bastion.config import CacheConfig, Config, SchedulerConfig
        from bastion.engine.kv_cache.kivi import KIVIKVCache
        from bastion.engine.kv_cache.quant import KVQuantSpec
        from bastion.engine.llm_engine import LLMEngine

        kv = KIVIKVCache(num_layers=arch.num_layers, num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim,
                         num_blocks=num_blocks, spec=KVQuantSpec(4, 2, 8, 8), num_seq_slots=4, fp_dtype=torch.float32)
        config = Config(cache=CacheConfig(kind="k4v2", num_blocks=num_blocks), scheduler=SchedulerConfig(max_num_seqs=4))
        engine = LLMEngine(config, model.eval(), kv, vocab_size=arch.vocab_size, eos_token_id=None, max_model_len=256)
    else:
        engine = make_engine(model.eval(), num_blocks=num_blocks, prefix_caching=prefix_caching)
    engine.enable_adapters(AdapterConfig(enabled=True, max_loras=4, max_lora_rank=16))
    return engine


def hf_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()
