"""Scheduler preemption and block accounting through the real LLMEngine: 200 mixed
requests on a tiny random fp32 model (real sampler, stop ids, EOS, aborts) and a few on
SmolLM2 fp32, each in a pool small enough to preempt, give the same tokens as with a big
pool and leave the pool empty; cached-prompt-token counts never exceed the prompt. The
model-free FakeLoop tests of the scheduler itself are in test_scheduler.py."""

from __future__ import annotations

import random

from tests.support.engines import assert_pool_clean


def test_engine_no_leak_and_no_corruption_with_tiny_model():
    """200 mixed requests through the real LLMEngine (tiny random fp32 model, real sampler):
    random lengths, greedy and seeded sampling, stop ids, EOS/ignore_eos/min_tokens, aborts,
    a pool small enough to preempt. The non-aborted outputs equal those of a big pool
    without preemption, and the pool ends empty."""
    from bastion.engine.sampling_params import SamplingParams as SP

    from tests.support.engines import make_engine, tiny_model

    model = tiny_model(seed=3, vocab_size=256, max_position_embeddings=256)
    rng = random.Random(7)
    shared = [rng.randrange(4, 256) for _ in range(20)]
    work = []
    for i in range(200):
        head = shared[: rng.choice([0, 8, 20])]
        prompt = head + [rng.randrange(4, 256) for _ in range(rng.randint(1, 24))]
        mt = rng.randint(1, 16)
        kw = dict(max_tokens=mt, stop_token_ids=tuple(rng.sample(range(256), 8)) if rng.random() < 0.3 else ())
        if rng.random() < 0.5:
            kw.update(temperature=0.8, seed=i, top_k=rng.choice([-1, 20]), top_p=rng.choice([1.0, 0.9]))
        else:
            kw.update(temperature=0)
        kw["ignore_eos"] = rng.random() < 0.2
        kw["min_tokens"] = rng.randint(0, mt) if rng.random() < 0.2 else 0
        work.append((f"w{i}", prompt, SP(**kw), rng.random() < 0.1, rng.randint(0, 3)))

    def run(num_blocks, aborts):
        eng = make_engine(model, num_blocks=num_blocks, block_size=4, max_num_batched_tokens=32,
                          max_num_seqs=8, eos_token_id=3)
        out, pending, finished = {}, list(work), {}
        step = 0
        while pending or eng.has_unfinished():
            for _ in range(rng.choice([1, 2, 3])):
                if not pending:
                    break
                rid, prompt, sp, abort, when = pending.pop(0)
                eng.add_request(rid, prompt, sp)
                out[rid] = []
                if aborts and abort:
                    finished[rid] = ("abort-at", step + when)
            for rid, (kind, at) in list(finished.items()):
                if kind == "abort-at" and step >= at:
                    eng.abort_request(rid)  # may already have finished: then a no-op
                    finished[rid] = ("abort", step)
            for o in eng.step():
                assert out[o.request_id] is not None, "output after finish"
                out[o.request_id] += o.new_token_ids
                if o.finished:
                    finished[o.request_id] = (o.finish_reason, step)
            step += 1
        assert_pool_clean(eng.block_manager)
        assert eng.requests == {} and not eng.scheduler.running and not eng.scheduler.waiting
        return eng, out, finished

    big, ref, ref_fin = run(num_blocks=400, aborts=False)
    assert big.scheduler.num_preemptions == 0
    small, got, fin = run(num_blocks=24, aborts=True)
    assert small.scheduler.num_preemptions > 10
    n_aborted = 0
    for rid, prompt, sp, abort, _ in work:
        reason = fin[rid][0]
        if reason == "abort":
            n_aborted += 1
            assert got[rid] == ref[rid][: len(got[rid])]
            continue
        assert got[rid] == ref[rid], rid
        assert reason == ref_fin[rid][0]
        toks = got[rid]
        if reason == "length":
            assert len(toks) == sp.max_tokens
        else:
            assert reason == "stop" and len(toks) >= sp.min_tokens
            assert toks[-1] in sp.stop_token_ids or (toks[-1] == 3 and not sp.ignore_eos)
    assert n_aborted >= 5


def test_preemption_real_model_same_greedy_output(smol_fp32, tokenizer):
    """SmolLM2 (fp32): a pool too small for the batch forces preemption by recompute; every
    request (greedy and seeded) finishes with the same tokens as with a large pool."""
    from bastion.engine.sampling_params import SamplingParams as SP

    from tests.support.engines import make_engine, run_engine

    from tests.support.text import gpl_text

    text = gpl_text()
    ids = tokenizer.encode(text)
    prompts = [ids[0:30], ids[100:125], ids[200:228], ids[300:320]]
    params = [SP(max_tokens=20, temperature=0, ignore_eos=True)] * 3 + [
        SP(max_tokens=20, temperature=0.8, seed=11, ignore_eos=True)]
    big = make_engine(smol_fp32, num_blocks=64, block_size=16)
    ref = run_engine(big, prompts, params)
    assert big.scheduler.num_preemptions == 0
    small = make_engine(smol_fp32, num_blocks=9, block_size=16)  # 4 x 3 blocks needed at the end
    got = run_engine(small, prompts, params)
    assert small.scheduler.num_preemptions >= 1
    for rid in ref:
        assert got[rid]["tokens"] == ref[rid]["tokens"], rid
        assert got[rid]["finish"] == "length"
    assert_pool_clean(small.block_manager)


def test_cached_prompt_tokens_never_exceed_the_prompt():
    """After preemption a request re-admitted from the prefix cache may hit blocks holding its
    own *output* tokens; num_cached_prompt_tokens (usage.prompt_tokens_details.cached_tokens
    in the API) counts prompt tokens only, so it must stay <= len(prompt)."""
    from bastion.engine.sampling_params import SamplingParams as SP

    from tests.support.engines import make_engine, tiny_model

    model = tiny_model(seed=4, vocab_size=128, max_position_embeddings=128)
    eng = make_engine(model, num_blocks=10, block_size=4, max_num_batched_tokens=64)
    eng.add_request("a", list(range(10, 16)), SP(max_tokens=20, temperature=0, ignore_eos=True))
    eng.add_request("b", list(range(40, 46)), SP(max_tokens=20, temperature=0, ignore_eos=True))
    seen = {"a": [], "b": []}
    while eng.has_unfinished():
        for o in eng.step():
            seen[o.request_id].append(o.num_cached_prompt_tokens)
    assert eng.scheduler.num_preemptions >= 1
    assert max(seen["a"] + seen["b"]) <= 6, seen


def test_priority_and_fair_policies_through_the_real_engine():
    """The policies through LLMEngine (tiny random model): under the priority policy a
    late urgent request preempts the running low-priority ones and finishes first, and
    every output equals the fcfs run's (preemption recomputes, it never changes tokens);
    under the fair policy a quiet tenant's request is served before a queued flood."""
    from bastion.engine.request import Scheduling
    from bastion.engine.sampling_params import SamplingParams as SP

    from tests.support.engines import make_engine, tiny_model

    model = tiny_model(seed=5, vocab_size=256, max_position_embeddings=256)
    rng = random.Random(11)
    prompts = {f"low{i}": [rng.randrange(4, 256) for _ in range(12)] for i in range(4)}
    prompts["urgent"] = [rng.randrange(4, 256) for _ in range(12)]

    def run(policy: str) -> tuple[list[str], dict[str, list[int]]]:
        engine = make_engine(model, num_blocks=64, max_num_seqs=2, policy=policy)
        outputs: dict[str, list[int]] = {rid: [] for rid in prompts}
        finished: list[str] = []
        for rid in [r for r in prompts if r != "urgent"]:
            engine.add_request(rid, prompts[rid], SP(max_tokens=12, temperature=0, ignore_eos=True),
                               scheduling=Scheduling(priority=5))
        for _ in range(3):
            for out in engine.step():
                outputs[out.request_id] += out.new_token_ids
        engine.add_request("urgent", prompts["urgent"], SP(max_tokens=4, temperature=0, ignore_eos=True),
                           scheduling=Scheduling(priority=0))
        while engine.has_unfinished():
            for out in engine.step():
                outputs[out.request_id] += out.new_token_ids
                if out.finished:
                    finished.append(out.request_id)
        assert_pool_clean(engine.block_manager)
        return finished, outputs

    fcfs_order, fcfs_out = run("fcfs")
    prio_order, prio_out = run("priority")
    assert fcfs_order.index("urgent") == 4 and prio_order[0] == "urgent"
    assert prio_out == fcfs_out

    engine = make_engine(model, num_blocks=64, max_num_seqs=2, policy="fair")
    for i in range(8):
        engine.add_request(f"flood{i}", prompts["low0"], SP(max_tokens=6, temperature=0, ignore_eos=True),
                           scheduling=Scheduling(tenant="flood"))
    engine.step()
    engine.add_request("quiet", prompts["urgent"], SP(max_tokens=6, temperature=0, ignore_eos=True),
                       scheduling=Scheduling(tenant="quiet"))
    finished = []
    while engine.has_unfinished():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished.index("quiet") <= 2  # right after the two running floods, not after all eight
