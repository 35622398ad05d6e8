"""Failure containment in LLMEngine.step(): an exception raised for one request fails
that request alone (finish_reason "error"); every other request finishes, with exactly
the tokens it would have produced in a run without the failure (fp cache), and no block
leaks. (With the KIVI cache a rolled-back request is recomputed in other chunks, which
moves its quantization boundaries, as any preemption does: there the bystanders must
finish in full, and tokens are compared for sampler failures, which roll nothing back.)

Faults are injected by wrapping the engine's sampler (per-row failures) or its model
runner (a batched forward that raises whenever the poisoned request is in the batch:
nothing in the exception names the culprit)."""

from __future__ import annotations

import pytest
import torch

from bastion.config import CacheConfig, Config, SchedulerConfig
from bastion.engine.kv_cache.kivi import KIVIKVCache
from bastion.engine.kv_cache.quant import KVQuantSpec
from bastion.engine.llm_engine import LLMEngine
from bastion.engine.sampling_params import SamplingParams

from tests.support.engines import assert_pool_clean, make_engine, run_engine, tiny_model

POISON = "r2"
PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _prompts(n=5):
    return [list(range(5 + 7 * i, 5 + 7 * i + 20 + 9 * i)) for i in range(n)]


def _kivi_engine(model):
    a = model.arch
    kv = KIVIKVCache(num_layers=a.num_layers, num_kv_heads=a.num_kv_heads, head_dim=a.head_dim, num_blocks=64,
                     spec=KVQuantSpec(4, 2, 8, 8), num_seq_slots=8, fp_dtype=torch.float32)
    config = Config(cache=CacheConfig(kind="k4v2", num_blocks=64),
                    scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=48))
    return LLMEngine(config, model, kv, vocab_size=a.vocab_size, eos_token_id=None,
                     max_model_len=model.rope_cos.shape[0])


ENGINES = {
    "fp": lambda m: make_engine(m, num_blocks=64, max_num_batched_tokens=48),
    "kivi": _kivi_engine,
}


class _PoisonedSampler:
    def __init__(self, inner, poison: str):
        self.inner, self.poison = inner, poison

    def __call__(self, logits, reqs, track_logits=None):
        if any(r.request_id == self.poison for r in reqs):
            raise IndexError("poisoned sampling parameters")
        return self.inner(logits, reqs, track_logits)


class _PoisonedRunner:
    """The forward raises whenever the poisoned request is scheduled (also when it runs alone)."""

    def __init__(self, inner, poison: str, after_steps: int = 0):
        self.inner, self.poison, self.after_steps, self.calls = inner, poison, after_steps, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def execute(self, batch):
        self.calls += 1
        if self.calls > self.after_steps and any(r.request_id == self.poison for r, _ in batch.items):
            out = self.inner.execute(batch)  # K/V written, then the failure (the worst case)
            raise RuntimeError(f"forward failed ({len(out.sample_reqs)} rows)")
        return self.inner.execute(batch)


@pytest.mark.parametrize("kind", list(ENGINES))
@pytest.mark.parametrize("where", ["sampler", "forward", "forward_mid_decode"])
def test_a_failing_request_fails_alone(kind, where):
    model = tiny_model()
    clean = run_engine(ENGINES[kind](model), _prompts(), PARAMS)
    engine = ENGINES[kind](model)
    if where == "sampler":
        engine.sampler = _PoisonedSampler(engine.sampler, POISON)
    else:
        engine.runner = _PoisonedRunner(engine.runner, POISON, after_steps=6 if where == "forward_mid_decode" else 0)
    res = run_engine(engine, _prompts(), PARAMS)
    assert res[POISON]["finish"] == "error"
    exact = kind == "fp" or where == "sampler"
    for rid, r in res.items():
        if rid != POISON:
            assert r["finish"] == "length" and len(r["tokens"]) == PARAMS.max_tokens, rid
            assert r["tokens"] == clean[rid]["tokens"] or not exact, rid
    assert_pool_clean(engine.block_manager)
    assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting
    # and the engine goes on serving
    again = run_engine(engine, _prompts(2), PARAMS, prefix="again")
    assert [r["tokens"] for r in again.values()] == [clean["r0"]["tokens"], clean["r1"]["tokens"]] or not exact
    assert all(r["finish"] == "length" for r in again.values())


def test_error_output_says_why():
    engine = make_engine(tiny_model(), num_blocks=16)
    engine.sampler = _PoisonedSampler(engine.sampler, "only")
    engine.add_request("only", [5, 6, 7], PARAMS)
    (out,) = engine.step()
    assert out.finished and out.finish_reason == "error" and "IndexError" in out.error
    assert not engine.has_unfinished()
    assert_pool_clean(engine.block_manager)


def test_out_of_range_parameters_are_refused_at_add_request():
    engine = make_engine(tiny_model(), num_blocks=16)
    vocab = engine.vocab_size
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.add_request("a", [5, 6], SamplingParams(min_tokens=1, stop_token_ids=(vocab,)))
    with pytest.raises(ValueError, match="top_k"):
        engine.add_request("b", [5, 6], SamplingParams(top_k=vocab + 1))
    assert not engine.has_unfinished()


def test_sampler_never_indexes_outside_the_vocabulary():
    """Defence in depth: even ids/top-k past the vocabulary (had add_request let them in)
    sample without raising."""
    from bastion.engine.request import Request
    from bastion.engine.sampler import Sampler

    logits = torch.randn(2, 50)
    reqs = [Request("a", [1], SamplingParams(min_tokens=3, stop_token_ids=(10**6, 2**62), temperature=0.7,
                                             top_k=10**12)),
            Request("b", [1], SamplingParams(temperature=0.5, top_k=2**63 - 1))]
    toks, _ = Sampler()(logits, reqs)
    assert all(0 <= t < 50 for t in toks)


@pytest.mark.parametrize("temperature", [1e-40, 1e-8, 5e-324])
def test_tiny_temperatures_are_greedy(temperature):
    engine = make_engine(tiny_model(), num_blocks=32)
    sampled = run_engine(engine, _prompts(2), SamplingParams(max_tokens=8, temperature=temperature,
                                                             ignore_eos=True, logprobs=1))
    greedy = run_engine(engine, _prompts(2), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                        prefix="g")
    assert [r["tokens"] for r in sampled.values()] == [r["tokens"] for r in greedy.values()]
    assert all(lp.logprob == lp.logprob for r in sampled.values() for lp in r["logprobs"])  # no NaN
