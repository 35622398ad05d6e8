"""The KIVI cache inside the engine: scheduling, preemption, cancel, byte-true sizing,
and quality on the real model (teacher-forced agreement with the fp cache)."""

from __future__ import annotations

import pytest
import torch

from bastion.config import CacheConfig, Config, ModelConfig, SchedulerConfig
from bastion.engine.kv_cache.factory import build_kv_cache
from bastion.engine.kv_cache.kivi import KIVIKVCache
from bastion.engine.kv_cache.quant import KVQuantSpec
from bastion.engine.llm_engine import LLMEngine
from bastion.engine.request import Request
from bastion.engine.sampling_params import SamplingParams
from bastion.engine.scheduler import ScheduledBatch
from bastion.serving.tokenizer import load_engine

from tests.support.engines import assert_pool_clean, run_engine, tiny_model

from tests.support.text import gpl_text


def _kivi_engine(model, *, num_blocks, slots=4, spec=KVQuantSpec(4, 2, 8, 8), sink=0, budget=64):
    a = model.arch
    kv = KIVIKVCache(num_layers=a.num_layers, num_kv_heads=a.num_kv_heads, head_dim=a.head_dim,
                     num_blocks=num_blocks, spec=spec, num_seq_slots=slots, sink=sink, fp_dtype=torch.float32)
    config = Config(cache=CacheConfig(kind="k4v2", num_blocks=num_blocks),
                    scheduler=SchedulerConfig(max_num_seqs=slots, max_num_batched_tokens=budget))
    return LLMEngine(config, model, kv, vocab_size=a.vocab_size, eos_token_id=None,
                     max_model_len=model.rope_cos.shape[0])


def _clean(engine):
    assert_pool_clean(engine.block_manager)
    assert sorted(engine.block_manager.free_seq_slots) == list(range(engine.kv_cache.num_seq_slots))


def test_preemption_frees_quantized_blocks_and_windows():
    model = tiny_model()
    eng = _kivi_engine(model, num_blocks=12, sink=8)  # 96 tokens for 3 sequences of 60: must preempt
    prompts = [list(range(3 + i, 43 + i)) for i in range(3)]
    res = run_engine(eng, prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert eng.scheduler.num_preemptions >= 1
    assert all(r["finish"] == "length" and len(r["tokens"]) == 20 for r in res.values())
    _clean(eng)


@pytest.mark.parametrize("when", [1, 4, 12])
def test_cancel_frees_quantized_blocks_and_windows(when):
    eng = _kivi_engine(tiny_model(), num_blocks=32)
    for i in range(3):
        eng.add_request(f"c{i}", list(range(5, 45)), SamplingParams(max_tokens=30, ignore_eos=True))
    for _ in range(when):
        eng.step()
    assert eng.block_manager.num_used_blocks > 0
    for i in range(3):
        eng.abort_request(f"c{i}")
    _clean(eng)
    run_engine(eng, [list(range(7, 30))], SamplingParams(max_tokens=5))  # and it still serves
    _clean(eng)


def test_budget_admits_proportionally_more_tokens():
    """Same --kv-memory: the block count follows the real bytes per token (fp windows charged)."""
    from bastion.engine.models.arch import ModelArch
    from tests.support.engines import tiny_llama_config

    arch = ModelArch.from_hf_config(tiny_llama_config(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                                                      num_key_value_heads=2))  # head_dim 64
    cpu = torch.device("cpu")

    def cache(kind, **kw):
        return build_kv_cache(Config(cache=CacheConfig(kind=kind, kv_memory_gb=0.01, **kw),
                                     scheduler=SchedulerConfig(max_num_seqs=4)), arch, torch.float16, cpu)

    fp = cache("fp16")
    q = cache("k4v2", kv_group_size=64, kv_residual=64)
    fp_tokens = fp.num_blocks * fp.block_size
    q_tokens = q.num_blocks * q.block_size
    assert q.token_bytes * 4.57 == pytest.approx(fp.token_bytes, rel=1e-3)  # 56 vs 256 bytes/elem-pair
    # the windows (4 slots x 128 tokens at fp16) come out of the same budget
    assert q_tokens * q.token_bytes + q.reserved_bytes <= 0.01 * 2**30
    assert q_tokens > 4 * fp_tokens
    with pytest.raises(ValueError, match="too small"):
        build_kv_cache(Config(cache=CacheConfig(kind="kivi", kv_memory_gb=1e-4)), arch, torch.float16, cpu)
    # one value range per head (--kv-value-group 64): 60 instead of 64 bytes per head-token
    qv = cache("k4v2", kv_value_group=64)
    assert qv.spec.value_group == 64 and qv.token_bytes * 64 == pytest.approx(cache("k4v2").token_bytes * 60)
    for bad in (6, 0):
        with pytest.raises(ValueError, match="kv_value_group"):
            CacheConfig(kind="k4v2", kv_value_group=bad)


def test_prefix_caching_is_off_for_quantized_caches():
    eng = _kivi_engine(tiny_model(), num_blocks=32)
    assert not eng.block_manager.prefix_caching


# ---------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def engines():
    def make(kind):
        cfg = Config(model=ModelConfig(dtype="float32", max_model_len=1024),
                     cache=CacheConfig(kind=kind, num_blocks=48), scheduler=SchedulerConfig(max_num_seqs=2))
        eng, tok, _ = load_engine(cfg, show_progress=False)
        return eng, tok

    return make("fp32"), make("kivi")


def _teacher_forced_logits(eng, ids, start):
    req = Request("tf", ids[:start], SamplingParams(max_tokens=1))
    rows, c = [], 0
    while c < start:  # the prompt in chunks, then one token per step
        n = min(256, start - c)
        assert eng.block_manager.allocate(req, n)
        out = eng.runner.execute(ScheduledBatch([(req, n)]))
        req.num_computed_tokens += n
        c += n
    rows.append(out.sample_logits[0])
    for t in ids[start:-1]:
        req.token_ids.append(t)
        assert eng.block_manager.allocate(req, 1)
        rows.append(eng.runner.execute(ScheduledBatch([(req, 1)])).sample_logits[0])
        req.num_computed_tokens += 1
    eng.block_manager.free_request(req)
    return torch.stack(rows)


def test_kivi_default_agrees_with_fp_on_real_text(engines):
    """Teacher-forced over 48 decode steps after a 600-token GPL-3 context: top-1 agreement
    with the fp cache >= 0.9 and NLL within 5%. Why these bars: the default config
    measures >= 95% agreement and <= 1% dPPL at 2k (docs/BENCHMARKS.md); 48 steps make one
    flip worth 2%, so 0.9 leaves room for noise while a broken path (wrong frontier,
    unrotated query, stale window) measures < 0.7 (kivi2 with no fixes is ~0.65)."""
    (fp, tok), (kv, _) = engines
    ids = tok(gpl_text(chars=6000))["input_ids"][:649]
    a, b = _teacher_forced_logits(fp, ids, 600), _teacher_forced_logits(kv, ids, 600)
    target = torch.tensor(ids[600:])
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    nll = [torch.nn.functional.cross_entropy(x, target).item() for x in (a, b)]
    assert agree >= 0.9, agree
    assert nll[1] <= nll[0] * 1.05, nll


def test_kivi_greedy_generation_is_coherent(engines):
    """Free-running greedy text from the kivi cache is as likely under the fp model as fp's
    own greedy text (within 0.3 nats/token): it stays on topic instead of degenerating."""
    (fp, tok), (kv, _) = engines
    prompt = tok(gpl_text(chars=3000))["input_ids"][:400]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    outs = {n: run_engine(e, [prompt], params, prefix=n)[f"{n}0"]["tokens"] for n, e in (("fp", fp), ("kv", kv))}
    for e in (fp, kv):
        assert e.block_manager.num_used_blocks == 0

    def nll_under_fp(cont):
        ids = prompt + cont
        logits = _teacher_forced_logits(fp, ids + [0], len(prompt))[:-1]
        return torch.nn.functional.cross_entropy(logits, torch.tensor(cont)).item()

    assert outs["kv"][:4] == outs["fp"][:4]
    assert nll_under_fp(outs["kv"]) <= nll_under_fp(outs["fp"]) + 0.3
