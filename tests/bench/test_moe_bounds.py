"""bench moe-bounds' offline simulations: Belady's optimum is the optimum (checked against an
exhaustive search over every start and every choice on small traces) and bounds the tier's
own replacement rules (which also pin a step's experts)."""

import random
from functools import lru_cache
from itertools import combinations

import pytest

from bastion.bench.moe_bounds import belady_hits, hit_rates, recall, record
from tests.support.moe import TINY_MIXTRAL_VOCAB as V
from tests.support.moe import save_tiny_mixtral


def _exhaustive(trace, capacity):
    """Best hit rate over every start and every keep/evict choice."""
    uses = [((layer, e), i) for i, (layer, experts) in enumerate(trace) for e in experts]
    keys = sorted({k for k, _ in uses})

    @lru_cache(maxsize=None)
    def best(j, cache):
        if j == len(uses):
            return 0
        k, i = uses[j]
        if k in cache:
            return 1 + best(j + 1, cache)
        if len(cache) < capacity:
            return best(j + 1, cache | {k})
        options = [best(j + 1, cache)]  # bypass
        options += [best(j + 1, (cache - {v}) | {k}) for v in cache]
        return max(options)
    return max(best(0, frozenset(c)) for c in combinations(keys, min(capacity, len(keys)))) / len(uses)


@pytest.mark.parametrize("seed", range(12))
def test_belady_is_the_optimum_and_bounds_every_rule(seed):
    rng = random.Random(seed)
    layers, experts, top_k = 2, 4, rng.choice((1, 2))
    trace = [(layer, sorted(rng.sample(range(experts), top_k))) for _ in range(7) for layer in range(layers)]
    capacity = rng.choice((2, 3, 4))
    popularity = {(layer, e): rng.randint(1, 9) for layer in range(layers) for e in range(experts)}
    half = len(trace) // 2
    opt = _exhaustive(trace[half:], capacity)
    assert belady_hits(trace[half:], capacity) == pytest.approx(opt)
    rates = hit_rates(trace, capacity, popularity, half)  # pass 2 = the second half
    assert rates["belady"] == pytest.approx(opt)
    assert all(rates[r] <= opt + 1e-12 for r in ("lru", "static", "lfu", "static_oracle")), rates


def test_cyclic_trace_defeats_lru_not_belady():
    trace = [(0, [e]) for e in [0, 1, 2] * 6]  # one layer, three experts in a cycle, room for two
    rates = hit_rates(trace, 2, {(0, 0): 1, (0, 1): 1, (0, 2): 1}, 0)
    assert rates["lru"] == 0.0  # each expert is evicted just before it comes back
    assert rates["belady"] >= 0.5


def test_recall_counts_named_experts():
    assert recall([{1, 2}, {3, 4}], [[1, 5], [3, 4]]) == pytest.approx(3 / 4)


def test_cli_refuses_a_budget_out_of_range(capsys):
    from bastion.cli import main

    assert main(["bench", "moe-bounds", "--budget", "1.5"]) == 2
    assert "--budget" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    return save_tiny_mixtral(tmp_path_factory.mktemp("tiny-mixtral"))


def test_record_traces_the_experts_the_model_ran(tiny_mixtral, monkeypatch):
    """The trace is rebuilt from the routers' inputs: it must equal what the MoE layers
    actually ran, step by step (bench moe's engine: bf16 for an HF directory)."""
    from bastion.engine.models import moe_offload

    ran = []
    real = moe_offload.ExpertOffload.schedule

    def spy(self, layer, active, counts, x):
        if x.shape[0] == 1:
            ran.append((layer, sorted(active)))
        return real(self, layer, active, counts, x)
    rng = random.Random(0)
    prompts = [[rng.randrange(V) for _ in range(12)] for _ in range(2)]
    monkeypatch.setattr(moe_offload.ExpertOffload, "schedule", spy)
    rec = record(tiny_mixtral, prompts, prompts[:1], new_tokens=5, threads=1)
    steps = 2 * len(prompts) * 4  # two passes, 5 tokens = 4 decode steps each after the prefill's
    assert rec["trace"] == ran[-steps * 3:] and len(rec["trace"]) == steps * 3  # 3 MoE layers
    assert len(rec["used"]) == steps * 2 and all(len(g) == steps * 2 for g in rec["guesses"].values())
    assert all(0.0 <= recall(g, rec["used"]) <= 1.0 for g in rec["guesses"].values())
