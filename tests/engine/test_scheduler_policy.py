"""Scheduling policies (engine/scheduler_policy.py) through the model-free FakeLoop of
test_scheduler.py, which checks every scheduled context intact and every output equal to
the reference whatever the order: fcfs, priority (order, preemption for admission and
under KV pressure, no churn among equals) and fair (VTC: a flood does not starve a quiet
tenant, weights, no credit banked while idle)."""

from __future__ import annotations

import pytest

from bastion.config import SchedulerConfig
from bastion.engine.scheduler_policy import OUTPUT_TOKEN_COST, PROMPT_TOKEN_COST
from tests.support.engines import assert_pool_clean
from tests.support.fake_loop import FakeLoop, reference_output


def admitted_order(loop: FakeLoop) -> list[str]:
    """Request ids in the order they were first scheduled."""
    seen: list[str] = []
    for batch in loop.batches:
        for rid, _, _ in batch:
            if rid not in seen:
                seen.append(rid)
    return seen


def test_policy_is_validated():
    with pytest.raises(ValueError, match="scheduling policy"):
        SchedulerConfig(policy="lottery")


# ---------------------------------------------------------------- priority
def test_priority_orders_admission_lower_first_ties_by_arrival():
    loop = FakeLoop(num_blocks=64, budget=64, max_num_seqs=1, policy="priority")
    for rid, prio in [("p5", 5), ("p0a", 0), ("p3", 3), ("p0b", 0), ("p-1", -1)]:
        loop.add(rid, [1, 2, 3, hash(rid) % 900], max_tokens=2, priority=prio)
    loop.run()
    assert admitted_order(loop) == ["p-1", "p0a", "p0b", "p3", "p5"]


def test_fcfs_ignores_priority():
    loop = FakeLoop(num_blocks=64, budget=64, max_num_seqs=1, policy="fcfs")
    for rid, prio in [("a", 5), ("b", 0), ("c", -3)]:
        loop.add(rid, [1, 2, 3], max_tokens=2, priority=prio)
    loop.run()
    assert admitted_order(loop) == ["a", "b", "c"]


def test_higher_priority_preempts_a_running_lower_one_at_the_seq_limit():
    loop = FakeLoop(num_blocks=64, budget=64, max_num_seqs=2, policy="priority")
    loop.add("low1", range(10, 20), max_tokens=30, priority=5)
    loop.add("low2", range(20, 30), max_tokens=30, priority=1)
    loop.step()
    loop.step()
    loop.add("urgent", range(30, 40), max_tokens=3, priority=0)
    batch = loop.step()
    ids = [r.request_id for r, _ in batch.items]
    # the worst running request (priority 5) made room; priority 1 kept running
    assert "urgent" in ids and "low2" in ids and "low1" not in ids
    assert loop.sched.num_preemptions == 1
    loop.run()
    for rid, prompt, mt in [("low1", range(10, 20), 30), ("low2", range(20, 30), 30), ("urgent", range(30, 40), 3)]:
        assert loop.finished[rid].output_token_ids == reference_output(prompt, mt)  # recompute lost nothing
    assert_pool_clean(loop.bm)


def test_equal_priority_never_preempts():
    loop = FakeLoop(num_blocks=64, budget=64, max_num_seqs=2, policy="priority")
    loop.add("a", range(10, 20), max_tokens=20, priority=1)
    loop.add("b", range(20, 30), max_tokens=20, priority=1)
    loop.step()
    loop.add("c", range(30, 40), max_tokens=2, priority=1)
    for _ in range(5):
        loop.step()
    assert loop.sched.num_preemptions == 0
    assert [r.request_id for r in loop.sched.waiting] == ["c"]


def test_higher_priority_takes_the_memory_of_a_lower_one():
    # 10 blocks of 4 tokens: "low" (prompt 20 + decodes) holds most of the pool
    loop = FakeLoop(num_blocks=10, budget=64, max_num_seqs=4, policy="priority", prefix_caching=False)
    loop.add("low", range(100, 128), max_tokens=8, priority=9)
    loop.step()
    loop.add("high", range(200, 216), max_tokens=4, priority=0)
    batch = loop.step()
    assert [r.request_id for r, _ in batch.items] == ["high"]  # low was preempted to admit it
    loop.run()
    assert loop.finished["high"].output_token_ids == reference_output(range(200, 216), 4)
    assert loop.finished["low"].output_token_ids == reference_output(range(100, 128), 8)
    assert_pool_clean(loop.bm)


def test_kv_pressure_preempts_the_lowest_priority_not_the_newest():
    loop = FakeLoop(num_blocks=12, budget=64, max_num_seqs=4, policy="priority", prefix_caching=False)
    # three requests that each grow; the oldest has the lowest priority
    loop.add("old-low", range(100, 112), max_tokens=20, priority=7)
    loop.add("mid", range(200, 212), max_tokens=20, priority=3)
    loop.add("new-high", range(300, 312), max_tokens=20, priority=0)
    preempted_first = None
    while loop.sched.has_unfinished():
        before = {r.request_id for r in loop.sched.running}
        loop.step()
        after = {r.request_id for r in loop.sched.running} | set(loop.finished)
        lost = before - after
        if lost and preempted_first is None:
            preempted_first = lost
    assert preempted_first == {"old-low"}
    for rid, base in [("old-low", 100), ("mid", 200), ("new-high", 300)]:
        assert loop.finished[rid].output_token_ids == reference_output(range(base, base + 12), 20)


# ---------------------------------------------------------------- fair (VTC)
def test_fair_mode_serves_a_quiet_tenant_before_a_flood():
    loop = FakeLoop(num_blocks=256, budget=32, max_num_seqs=2, policy="fair")
    for i in range(20):
        loop.add(f"flood{i}", [7, i, 3, 4], max_tokens=6, tenant="flood")
    for _ in range(4):
        loop.step()
    loop.add("quiet0", [9, 9, 9], max_tokens=6, tenant="quiet")
    loop.add("quiet1", [9, 9, 8], max_tokens=6, tenant="quiet")
    loop.run()
    order = admitted_order(loop)
    # the quiet tenant is admitted as soon as a running slot frees, ahead of 18 queued floods
    assert order.index("quiet0") <= 3 and order.index("quiet1") <= 5


def test_fcfs_lets_the_flood_starve_the_quiet_tenant():
    loop = FakeLoop(num_blocks=256, budget=32, max_num_seqs=2, policy="fcfs")
    for i in range(20):
        loop.add(f"flood{i}", [7, i, 3, 4], max_tokens=6, tenant="flood")
    loop.step()
    loop.add("quiet0", [9, 9, 9], max_tokens=6, tenant="quiet")
    loop.run()
    assert admitted_order(loop).index("quiet0") == 20  # the control: what fair mode fixes


def test_fair_weights_share_service_in_proportion():
    loop = FakeLoop(num_blocks=512, budget=8, max_num_seqs=2, policy="fair")
    for i in range(30):
        loop.add(f"a{i}", [1, i, 2], max_tokens=8, tenant="a", weight=1.0)
        loop.add(f"b{i}", [3, i, 4], max_tokens=8, tenant="b", weight=2.0)
    for _ in range(120):  # both stay backlogged throughout
        loop.step()
    counters = loop.sched.policy.counters
    # equal weighted service => b received about twice a's raw tokens
    assert abs(counters["a"] - counters["b"]) <= 2 * (3 * PROMPT_TOKEN_COST + 8 * OUTPUT_TOKEN_COST)
    done_a = sum(1 for r in loop.finished if r.startswith("a"))
    done_b = sum(1 for r in loop.finished if r.startswith("b"))
    assert 1.5 <= done_b / max(done_a, 1) <= 2.6


def test_fair_mode_banks_no_credit_while_idle():
    loop = FakeLoop(num_blocks=512, budget=16, max_num_seqs=2, policy="fair")
    for i in range(10):
        loop.add(f"a{i}", [1, i], max_tokens=8, tenant="a")
    loop.run()  # a alone for a long time; b was idle
    served_a = loop.sched.policy.counters["a"]
    for i in range(10):
        loop.add(f"a2-{i}", [5, i], max_tokens=8, tenant="a")
    loop.add("b0", [6, 0], max_tokens=8, tenant="b")
    # b's counter starts at a's, not at 0: b gets its turn, not the whole machine
    assert loop.sched.policy.counters["b"] == served_a
    for i in range(1, 10):
        loop.add(f"b{i}", [6, i], max_tokens=8, tenant="b")
    for _ in range(20):
        loop.step()
    order = admitted_order(loop)[10:]
    first_six = order[:6]
    assert 2 <= sum(r.startswith("b") for r in first_six) <= 4  # interleaved


def test_fair_mode_does_not_charge_recompute():
    loop = FakeLoop(num_blocks=8, budget=64, max_num_seqs=4, policy="fair", prefix_caching=False)
    loop.add("x", range(100, 112), max_tokens=12, tenant="t")
    loop.add("y", range(200, 212), max_tokens=12, tenant="u")
    loop.run()
    assert loop.sched.num_preemptions > 0
    total = loop.sched.policy.counters["t"] + loop.sched.policy.counters["u"]
    # each request is charged exactly once for its prompt and its outputs (the outputs'
    # last token is sampled, never computed)
    per_request = 12 * PROMPT_TOKEN_COST + 11 * OUTPUT_TOKEN_COST
    assert total == pytest.approx(2 * per_request)


def test_fair_mode_takes_a_slot_from_a_tenant_above_its_share():
    loop = FakeLoop(num_blocks=256, budget=64, max_num_seqs=4, policy="fair")
    for i in range(8):
        loop.add(f"flood{i}", [7, i, 3, 4], max_tokens=40, tenant="flood")
    for _ in range(3):
        loop.step()
    assert {r.request_id for r in loop.sched.running} == {f"flood{i}" for i in range(4)}
    loop.add("quiet", [9, 9, 9], max_tokens=4, tenant="quiet")
    batch = loop.step()
    assert "quiet" in [r.request_id for r, _ in batch.items]  # at once, not when a flood request ends
    assert loop.sched.num_preemptions == 1
    loop.add("quiet2", [9, 9, 8], max_tokens=4, tenant="quiet")
    loop.step()
    assert loop.sched.num_preemptions == 2  # still within its share (2 of 4)
    loop.add("quiet3", [9, 8, 8], max_tokens=4, tenant="quiet")
    loop.step()
    assert loop.sched.num_preemptions == 2  # a third would be above it: it waits its turn
    loop.run()
    for i in range(8):  # the preempted floods lost nothing
        assert loop.finished[f"flood{i}"].output_token_ids == reference_output([7, i, 3, 4], 40)
    assert_pool_clean(loop.bm)


def test_fair_mode_never_preempts_between_tenants_at_their_share():
    loop = FakeLoop(num_blocks=256, budget=64, max_num_seqs=4, policy="fair")
    for i in range(6):
        loop.add(f"a{i}", [1, i], max_tokens=12, tenant="a")
        loop.add(f"b{i}", [2, i], max_tokens=12, tenant="b")
    loop.run()
    assert loop.sched.num_preemptions == 0


@pytest.mark.parametrize("policy", ["fair", "fcfs"])
def test_fair_mode_prefills_a_quiet_tenant_without_the_floods_prompts(policy):
    # "flood" has one request decoding and one long prompt in chunked prefill; the quiet
    # tenant's prompt then arrives. Fair: its step carries the flood's decode but not the
    # flood's next prompt chunk (the step lasts the quiet prompt, not the whole budget).
    loop = FakeLoop(num_blocks=256, budget=64, max_num_seqs=8, policy=policy)
    loop.add("flood-dec", [5, 6, 7, 8], max_tokens=30, tenant="flood")
    loop.add("flood-long", list(range(100, 300)), max_tokens=4, tenant="flood")
    loop.step()
    loop.step()
    loop.add("quiet", [9, 9, 9, 9, 9, 9], max_tokens=4, tenant="quiet")
    batch = {r.request_id: n for r, n in loop.sched.schedule().items}
    if policy == "fair":
        assert batch == {"quiet": 6, "flood-dec": 1}
    else:  # fcfs: the flood's chunk takes the rest of the budget and the quiet prompt waits
        assert batch == {"flood-dec": 1, "flood-long": 63}
    loop2 = FakeLoop(num_blocks=256, budget=64, max_num_seqs=8, policy=policy)
    loop2.add("flood-dec", [5, 6, 7, 8], max_tokens=30, tenant="flood")
    loop2.add("flood-long", list(range(100, 300)), max_tokens=4, tenant="flood")
    loop2.add("quiet", [9, 9, 9, 9, 9, 9], max_tokens=4, tenant="quiet")
    loop2.run()  # nothing starves, nothing is lost
    assert loop2.finished["flood-long"].output_token_ids == reference_output(list(range(100, 300)), 4)
    assert loop2.finished["quiet"].output_token_ids == reference_output([9] * 6, 4)
    assert_pool_clean(loop2.bm)


def test_fair_mode_tenants_at_their_share_still_share_prefill_steps():
    loop = FakeLoop(num_blocks=256, budget=64, max_num_seqs=4, policy="fair")
    loop.add("a", list(range(10, 40)), max_tokens=4, tenant="a")
    loop.add("b", list(range(40, 70)), max_tokens=4, tenant="b")
    batch = {r.request_id: n for r, n in loop.sched.schedule().items}
    assert batch == {"a": 30, "b": 30}  # two equal tenants: neither excludes the other


def test_fair_mode_quiet_prompt_mid_burst_is_prefilled_alone():
    # The flood's first 32 prompts are still being admitted (4 per step) when the quiet
    # tenant arrives; its counter is lifted to the flood's, so ranks tie and the flood's
    # older requests come first in arrival order: the quiet prompt must still get a step
    # with no flood prompt in it (the flood's decodes ride along).
    loop = FakeLoop(num_blocks=4096, block_size=16, budget=512, max_num_seqs=16, policy="fair")
    for i in range(32):
        loop.add(f"f{i}", [i, *range(1, 128)], max_tokens=64, tenant="flood")
    for _ in range(3):
        loop.step()
    loop.add("quiet", [999, *range(500, 627)], max_tokens=8, tenant="quiet")
    loop.step()
    assert [(rid, n) for rid, _, n in loop.batches[-1] if n > 1] == [("quiet", 128)]
    loop.run()
    assert loop.finished["quiet"].output_token_ids == reference_output([999, *range(500, 627)], 8)
    assert len(loop.finished) == 33
    assert_pool_clean(loop.bm)
