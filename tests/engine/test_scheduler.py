"""Scheduler + BlockManager driven by a fake, model-free loop (tests/support/fake_loop.py:
every scheduled context is checked intact, outputs are a pure function of the sequence).

Covers admission (budget, chunked prefill, max_num_seqs, FCFS), preemption by recompute,
abort and the no-leak run of 200 mixed requests. The same properties through the real
LLMEngine (tiny random model, SmolLM2) are in test_scheduler_engine.py."""

from __future__ import annotations

import random

import pytest

from bastion.engine.request import Status
from tests.support.engines import assert_pool_clean
from tests.support.fake_loop import FakeLoop, V, reference_output


# ---------------------------------------------------------------- budget and chunking
def test_token_budget_respected_and_long_prompt_chunked():
    loop = FakeLoop(num_blocks=64, block_size=4, budget=16)
    loop.add("long", range(50), max_tokens=3)
    loop.run()
    chunks = [n for b in loop.batches for rid, c, n in b]
    # 50-token prompt: 16 + 16 + 16 + 2, then 2 single-token decodes
    assert chunks == [16, 16, 16, 2, 1, 1]
    starts = [c for b in loop.batches for rid, c, n in b]
    assert starts == [0, 16, 32, 48, 50, 51]
    assert loop.finished["long"].output_token_ids == reference_output(range(50), 3)


def test_decodes_scheduled_before_prefill_chunks():
    loop = FakeLoop(num_blocks=128, block_size=4, budget=8)
    for i in range(3):
        loop.add(f"d{i}", [100 + i, 5, 6], max_tokens=20)
    loop.step()  # three 3-token prompts (9 > 8: the third is chunked)
    loop.step()
    loop.add("big", range(300, 340), max_tokens=2)
    for _ in range(6):
        b = loop.step()
        kinds = [(r.request_id, n) for r, n in b.items]
        # every running decode gets its token, before (and out of the budget of) the prompt
        assert kinds[:3] == [("d0", 1), ("d1", 1), ("d2", 1)]
        assert kinds[3] == ("big", 5)
    loop.run()
    assert loop.finished["big"].output_token_ids == reference_output(range(300, 340), 2)


def test_max_num_seqs_caps_running():
    loop = FakeLoop(num_blocks=128, block_size=4, budget=64, max_num_seqs=3)
    for i in range(7):
        loop.add(f"r{i}", [i, i + 1], max_tokens=4)
    b = loop.step()
    assert [r.request_id for r, _ in b.items] == ["r0", "r1", "r2"]
    assert len(loop.sched.waiting) == 4
    loop.run()
    assert len(loop.finished) == 7


def test_admission_is_fcfs_when_memory_is_short():
    loop = FakeLoop(num_blocks=6, block_size=4, budget=64)
    loop.add("a", range(16), max_tokens=4)  # 4 blocks
    loop.add("b", range(100, 112), max_tokens=2)  # 3 blocks: does not fit next to a
    loop.add("c", [1], max_tokens=1)  # would fit, but must not overtake b
    b = loop.step()
    assert [r.request_id for r, _ in b.items] == ["a"]
    assert [r.request_id for r in loop.sched.waiting] == ["b", "c"]
    loop.run()
    assert loop.finished["b"].output_token_ids == reference_output(range(100, 112), 2)
    assert loop.finished["c"].output_token_ids == reference_output([1], 1)


# ---------------------------------------------------------------- preemption
def test_preemption_by_recompute():
    loop = FakeLoop(num_blocks=8, block_size=4, budget=64, max_num_seqs=2)
    a = loop.add("a", range(10), max_tokens=12)  # 22 tokens -> 6 blocks at the end
    b = loop.add("b", range(50, 60), max_tokens=12)
    c = loop.add("c", [1, 2], max_tokens=2)  # waits (max_num_seqs)
    loop.step()  # both prompts: 3 + 3 blocks
    assert a.status is Status.RUNNING and b.status is Status.RUNNING
    seen = None
    first_seen = {}
    for step in range(40):
        batch = loop.step()
        for pos, (r, _) in enumerate(batch.items):
            first_seen.setdefault((r.request_id, r.num_preemptions), (step, pos))
        if b.num_preemptions and seen is None:
            # the newest running request is the victim; it goes to the FRONT of waiting,
            # keeps every token (prompt + outputs so far) and owns no blocks
            seen = list(b.token_ids)
            assert list(loop.sched.waiting) == [b, c] and b.status is Status.WAITING
            assert b.num_computed_tokens == 0 and b.tracks[0].block_ids == [] and b.num_output_tokens > 0
            assert a.num_preemptions == 0 and a in loop.sched.running
        if not loop.sched.has_unfinished():
            break
    assert seen is not None, "the pool never ran out"
    assert loop.sched.num_preemptions >= 1
    fin = loop.finished
    assert fin["b"].token_ids[: len(seen)] == seen
    assert fin["a"].output_token_ids == reference_output(range(10), 12)
    assert fin["b"].output_token_ids == reference_output(range(50, 60), 12)
    assert fin["c"].output_token_ids == reference_output([1, 2], 2)
    assert first_seen[("b", 1)] < first_seen[("c", 0)]  # re-admitted before the older waiter
    assert_pool_clean(loop.bm)


def test_preempted_request_is_readmitted_before_newer_ones():
    loop = FakeLoop(num_blocks=8, block_size=4, budget=64)
    loop.add("a", range(10), max_tokens=12)
    b = loop.add("b", range(50, 60), max_tokens=12)
    loop.step()
    while not b.num_preemptions:
        loop.step()
    loop.add("late", [7, 7, 7], max_tokens=2)
    assert [r.request_id for r in loop.sched.waiting] == ["b", "late"]
    admitted = []
    while loop.sched.has_unfinished():
        for r, n in loop.step().items:
            if r.request_id not in admitted:
                admitted.append(r.request_id)
    assert admitted.index("b") < admitted.index("late")


def test_preemption_with_prefix_caching_recomputes_from_cache():
    """A preempted request finds its own full blocks in the cache when re-admitted."""
    loop = FakeLoop(num_blocks=10, block_size=4, budget=64)
    loop.add("a", range(12), max_tokens=20)
    b = loop.add("b", range(40, 52), max_tokens=20)
    loop.run()
    assert b.num_preemptions >= 1 or loop.finished["a"].num_preemptions >= 1
    for rid, prompt in (("a", range(12)), ("b", range(40, 52))):
        assert loop.finished[rid].output_token_ids == reference_output(prompt, 20)
    assert_pool_clean(loop.bm)


def test_single_request_that_fills_the_pool_never_deadlocks():
    loop = FakeLoop(num_blocks=4, block_size=4, budget=8)
    loop.add("a", range(6), max_tokens=10)  # exactly 16 tokens = the whole pool
    loop.add("b", range(20, 26), max_tokens=10)
    loop.run()
    assert set(loop.finished) == {"a", "b"}
    assert loop.finished["b"].output_token_ids == reference_output(range(20, 26), 10)


# ---------------------------------------------------------------- cancel / abort
@pytest.mark.parametrize("where", ["waiting", "running-prefill", "running-decode", "preempted"])
def test_abort_frees_blocks_at_once(where):
    loop = FakeLoop(num_blocks=8, block_size=4, budget=8)
    other = loop.add("other", range(10), max_tokens=12)
    victim = loop.add("v", range(100, 110), max_tokens=12)
    if where == "waiting":
        pass
    elif where == "running-prefill":
        loop.step()
        loop.step()  # other's prompt done (8 + 2), v got 6 of 10
        assert victim.status is Status.RUNNING and victim.num_computed_tokens < victim.num_prompt_tokens
    elif where == "running-decode":
        while victim.num_output_tokens < 2:
            loop.step()
    else:
        while not victim.num_preemptions:
            loop.step()
        assert victim.status is Status.WAITING
    used_by_other = len(other.tracks[0].block_ids)
    loop.finish(victim, "abort")
    assert victim.status is Status.FINISHED and victim.finish_reason == "abort"
    assert victim.tracks[0].block_ids == []
    assert victim not in loop.sched.running and victim not in loop.sched.waiting
    assert loop.bm.num_used_blocks == used_by_other
    loop.check_refcounts()
    loop.sched.finish(victim, "abort")  # idempotent
    loop.run()
    assert loop.finished["other"].output_token_ids == reference_output(range(10), 12)
    assert_pool_clean(loop.bm)


def test_abort_of_a_request_sharing_prefix_keeps_the_others_blocks():
    loop = FakeLoop(num_blocks=32, block_size=4, budget=64)
    shared = list(range(500, 516))
    a = loop.add("a", shared + [1, 2], max_tokens=6)
    loop.step()
    b = loop.add("b", shared + [3], max_tokens=6)
    loop.step()
    assert b.num_cached_tokens == 16 and b.tracks[0].block_ids[:4] == a.tracks[0].block_ids[:4]
    loop.finish(a, "abort")
    assert all(loop.bm.ref_count[x] == 1 for x in b.tracks[0].block_ids)
    loop.run()  # b's context is checked intact at every step
    assert loop.finished["b"].output_token_ids == reference_output(shared + [3], 6)
    assert_pool_clean(loop.bm)


# ---------------------------------------------------------------- no leak after many mixed requests
@pytest.mark.parametrize("prefix_caching,policy", [(True, "fcfs"), (False, "fcfs"), (True, "priority"),
                                                   (True, "fair")])
def test_no_block_leak_after_200_mixed_requests(prefix_caching, policy):
    """Every policy (priorities and tenants drawn at random: priority preempts for
    admission, fair reorders) keeps every context intact and leaks nothing."""
    rng = random.Random(1234 + prefix_caching)
    loop = FakeLoop(num_blocks=40, block_size=4, budget=24, max_num_seqs=6, prefix_caching=prefix_caching,
                    policy=policy)
    shared = [list(range(k * 100, k * 100 + 12)) for k in range(3)]
    expected = {}
    aborted = set()
    n_added = 0
    while n_added < 200 or loop.sched.has_unfinished():
        for _ in range(rng.choice([0, 0, 1, 2])):
            if n_added >= 200:
                break
            head = rng.choice(shared) if rng.random() < 0.5 else []
            prompt = head + [rng.randrange(V) for _ in range(rng.randint(1, 30))]
            mt = rng.randint(1, 24)
            stops = tuple(rng.sample(range(V), 40)) if rng.random() < 0.3 else ()
            rid = f"q{n_added}"
            loop.add(rid, prompt, mt, stops, salt=rng.choice(["", "", "s"]), priority=rng.randint(0, 3),
                     tenant=rng.choice("abc"), weight=rng.choice([1.0, 2.0]))
            expected[rid] = reference_output(prompt, mt, stops)
            n_added += 1
        live = list(loop.sched.running) + list(loop.sched.waiting)
        if live and rng.random() < 0.08:
            victim = rng.choice(live)
            loop.finish(victim, "abort")
            aborted.add(victim.request_id)
        if loop.sched.has_unfinished():
            assert loop.step()
    assert len(loop.finished) == 200
    assert loop.sched.num_preemptions > 0  # the pool was tight enough to preempt
    assert 10 < len(aborted) < 100
    for rid, r in loop.finished.items():
        assert r.tracks[0].block_ids == []
        if rid in aborted:
            assert r.finish_reason == "abort"
            assert r.output_token_ids == expected[rid][: r.num_output_tokens]
        else:
            assert r.output_token_ids == expected[rid], rid
            stopped = bool(set(r.output_token_ids) & set(r.params.stop_token_ids))
            assert r.finish_reason == ("stop" if stopped else "length")
    assert not loop.sched.running and not loop.sched.waiting
    assert_pool_clean(loop.bm)
