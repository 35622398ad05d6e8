"""Engine test helpers: tiny models, direct forward passes, engine loops."""

from __future__ import annotations

import torch

from bastion.config import CacheConfig, Config, SchedulerConfig
from bastion.engine.kv_cache.base import AttentionMetadata, PrefillSegment
from bastion.engine.kv_cache.fp import FPKVCache
from bastion.engine.llm_engine import LLMEngine
from bastion.engine.models.arch import ModelArch
from bastion.engine.models.llama import LlamaForCausalLM
from bastion.engine.sampling_params import SamplingParams


def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rms_norm_eps=1e-6, tie_word_embeddings=False)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_model(seed: int = 0, **cfg_kw) -> LlamaForCausalLM:
    """A random tiny Llama built with our class only (no HF weights): for shape/plumbing tests."""
    arch = ModelArch.from_hf_config(tiny_llama_config(**cfg_kw))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(arch, arch.max_position_embeddings)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for layer in model.layers:
            layer.input_layernorm.fill_(1.0)
            layer.post_attention_layernorm.fill_(1.0)
        model.norm.fill_(1.0)
    return model.eval()


def build_model(ckpt, dtype=torch.float32, max_len: int | None = None) -> LlamaForCausalLM:
    """Our model from a LoadedCheckpoint, as LLMEngine.from_config builds it."""
    model = LlamaForCausalLM(ckpt.arch, max_len or min(ckpt.arch.max_context(), 4096))
    model.load_hf_state_dict(ckpt.weights)
    model = model.to(dtype=dtype).eval()
    model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()
    return model


def make_kv(model: LlamaForCausalLM, num_blocks: int, block_size: int = 16, dtype=None) -> FPKVCache:
    a = model.arch
    return FPKVCache(num_layers=a.num_layers, num_kv_heads=a.num_kv_heads, head_dim=a.head_dim,
                     num_blocks=num_blocks, block_size=block_size,
                     dtype=dtype or next(model.parameters()).dtype, device=torch.device("cpu"))


def one_shot_logits(model: LlamaForCausalLM, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits [T, V] fp32 of a whole prompt computed in one prefill segment."""
    t = len(ids)
    kv = make_kv(model, -(-t // block_size), block_size)
    slots = torch.arange(t)
    meta = AttentionMetadata(slot_mapping=slots, prefills=[PrefillSegment(0, t, slots)])
    hidden = model(torch.tensor(ids), torch.arange(t), meta, kv)
    return model.compute_logits(hidden)


def decode_one_by_one(model: LlamaForCausalLM, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits [T, V] fp32 of a prompt fed one token per forward (the batch-1 decode rows)."""
    t = len(ids)
    kv = make_kv(model, -(-t // block_size), block_size)
    rows = []
    for i in range(t):
        meta = AttentionMetadata(slot_mapping=torch.tensor([i]), prefills=[PrefillSegment(0, 1, torch.arange(i + 1))])
        rows.append(model.compute_logits(model(torch.tensor([ids[i]]), torch.tensor([i]), meta, kv)))
    return torch.cat(rows)


def make_engine(model: LlamaForCausalLM, *, num_blocks: int, block_size: int = 16,
                max_num_batched_tokens: int = 512, max_num_seqs: int = 64, prefix_caching: bool = True,
                eos_token_id: int | None = None, max_model_len: int | None = None, policy: str = "fcfs") -> LLMEngine:
    """An LLMEngine around an already built model (no checkpoint load)."""
    config = Config(cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, prefix_caching=prefix_caching),
                    scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                              policy=policy))
    kv = make_kv(model, num_blocks, block_size)
    return LLMEngine(config, model, kv, vocab_size=model.arch.vocab_size, eos_token_id=eos_token_id,
                     max_model_len=max_model_len or model.rope_cos.shape[0])


def run_engine(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
               prefix: str = "r", cache_salt: str = "") -> dict[str, dict]:
    """Add all prompts, step to completion, return per-request tokens/finish/etc (keyed in order)."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    res: dict[str, dict] = {}
    for i, (p, sp) in enumerate(zip(prompts, plist)):
        rid = f"{prefix}{i}"
        engine.add_request(rid, p, sp, cache_salt=cache_salt)
        res[rid] = {"tokens": [], "logprobs": [], "finish": None, "prompt_logprobs": None, "cached": None}
    while engine.has_unfinished():
        for out in engine.step():
            r = res[out.request_id]
            r["tokens"] += out.new_token_ids
            r["logprobs"] += out.new_logprobs or []
            if out.prompt_logprobs is not None:
                r["prompt_logprobs"] = out.prompt_logprobs
            if r["cached"] is None:
                r["cached"] = out.num_cached_prompt_tokens
            if out.finished:
                assert r["finish"] is None, "a request finished twice"
                r["finish"] = out.finish_reason
    return res


def assert_pool_clean(bm) -> None:
    assert bm.num_used_blocks == 0
    assert all(c == 0 for c in bm.ref_count), [i for i, c in enumerate(bm.ref_count) if c]
    assert sorted(bm.free) == list(range(bm.num_blocks))


def teacher_force(engine: LLMEngine, text_ids: list[int], end: int | None = None, budget_check: int | None = None):
    """Step the engine's scheduler + runner like LLMEngine.step, but append the true next
    token of `text_ids` instead of sampling (every request must be a prefix of text_ids).
    Returns (records, batches): records are ("prompt", rid, first_pos, rows[n, V]) and
    ("sample", rid, pos, row[V]) where row predicts text_ids[pos + 1]; batches are the
    [(rid, n)] of each step. Requests finish when they reach `end` tokens."""
    end = end or len(text_ids)
    records, batches = [], []
    while engine.has_unfinished():
        batch = engine.scheduler.schedule()
        if budget_check is not None:
            assert batch.num_tokens <= budget_check
        batches.append([(r.request_id, n) for r, n in batch.items])
        logits = engine.runner.execute(batch)
        for rid, (first, rows) in logits.prompt_logits.items():
            records.append(("prompt", rid, first, rows))
        for req, n in batch.items:
            req.num_computed_tokens += n
            engine.block_manager.cache_full_blocks(req)
        for req, row in zip(logits.sample_reqs, logits.sample_logits if logits.sample_reqs else []):
            assert req.token_ids == text_ids[: req.num_tokens]
            records.append(("sample", req.request_id, req.num_tokens - 1, row))
            if req.num_tokens >= end:
                engine.scheduler.finish(req, "length")
                engine.requests.pop(req.request_id, None)
            else:
                req.token_ids.append(text_ids[req.num_tokens])
    return records, batches


def randomize(model, seed: int) -> None:
    """HF's init (std 0.02, zero biases, unit norms) makes near-uniform attention, tiny
    logits and near-uniform MoE routers that would hide errors; use weights that give
    O(1..10) logits and routers that prefer some experts instead."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 * 1.5)
