"""Sampler on synthetic logits: greedy, seeds, top-k/top-p, min_tokens masks, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from bastion.engine.request import Request
from bastion.engine.sampler import Sampler, _top_k_top_p, token_logprobs
from bastion.engine.sampling_params import SamplingParams

V = 64


def mk(i=0, eos=None, prompt=(1, 2, 3), outputs=(), **kw):
    r = Request(f"r{i}", list(prompt), SamplingParams(**{"max_tokens": 32, **kw}), eos_token_id=eos)
    r.token_ids += list(outputs)
    return r


def logits(n=4, seed=0, scale=3.0):
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * scale


def draw(reqs, lg, steps, sampler=None):
    s = sampler or Sampler()
    out = []
    for _ in range(steps):
        ids, _ = s(lg, reqs)
        out.append(ids)
    return out


def test_greedy_is_argmax():
    lg = logits(6)
    ids, lps = Sampler()(lg, [mk(i, temperature=0) for i in range(6)])
    assert ids == lg.argmax(-1).tolist()
    assert lps == [None] * 6


def test_same_seed_same_tokens_different_seeds_differ():
    lg = logits(1, scale=0.5)  # flat-ish: sampling really varies
    runs = {}
    for seed in (1, 1, 2):
        r = mk(temperature=1.0, seed=seed)
        runs.setdefault(seed, []).append([t[0] for t in draw([r], lg, 30)])
    assert runs[1][0] == runs[1][1]
    assert runs[1][0] != runs[2][0]
    assert len(set(runs[1][0])) > 5  # it is sampling, not argmax


def test_seeded_row_independent_of_batch_neighbours():
    lg = logits(3, scale=0.5)
    alone = [t[0] for t in draw([mk(temperature=1.0, seed=5)], lg[1:2], 20)]
    batch = draw([mk(0, temperature=1.0), mk(1, temperature=1.0, seed=5), mk(2, temperature=0.3, seed=9)], lg, 20)
    assert [t[1] for t in batch] == alone


def test_unseeded_sampler_seed_reproducible():
    lg = logits(2, scale=0.5)
    a = draw([mk(0, temperature=1.0), mk(1, temperature=1.0)], lg, 10, Sampler(seed=3))
    b = draw([mk(0, temperature=1.0), mk(1, temperature=1.0)], lg, 10, Sampler(seed=3))
    assert a == b


def test_sampling_follows_the_distribution():
    lg = torch.tensor([[math.log(0.6), math.log(0.3), math.log(0.1)] + [-1e9] * (V - 3)])
    r = mk(temperature=1.0, seed=0)
    counts = torch.bincount(torch.tensor([t[0] for t in draw([r], lg, 2000)]), minlength=V)
    assert counts[3:].sum() == 0
    freq = counts[:3].float() / 2000
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.05), freq
    # temperature sharpens: at T=0.25 token 0 dominates (0.6^4 : 0.3^4 : 0.1^4)
    r = mk(temperature=0.25, seed=0)
    counts = torch.bincount(torch.tensor([t[0] for t in draw([r], lg, 500)]), minlength=V)
    assert counts[0] > 450


def test_top_k_1_and_tiny_top_p_equal_greedy():
    lg = logits(8, scale=1.0)
    greedy = lg.argmax(-1).tolist()
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=5, top_p=1e-3)):
        reqs = [mk(i, temperature=1.5, seed=i, **kw) for i in range(8)]
        for ids in draw(reqs, lg, 5):
            assert ids == greedy, kw


def test_top_k_restricts_support():
    lg = logits(1, scale=0.3)
    allowed = set(lg[0].topk(3).indices.tolist())
    seen = {t[0] for t in draw([mk(temperature=1.0, seed=1, top_k=3)], lg, 300)}
    assert seen == allowed


def test_top_p_keeps_smallest_prefix_reaching_p():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    lg = torch.log(p)[None]
    masked = _top_k_top_p(lg.clone(), [0], [0.8])  # 0.5 + 0.3 reaches 0.8: keep two
    assert torch.isfinite(masked[0]).tolist() == [True, True, False, False]
    masked = _top_k_top_p(lg.clone(), [0], [0.81])
    assert torch.isfinite(masked[0]).tolist() == [True, True, True, False]
    # rows are independent; top-k applies too; unsorted input is handled
    lg2 = torch.log(torch.tensor([[0.05, 0.15, 0.3, 0.5], [0.25, 0.25, 0.25, 0.25]]))
    masked = _top_k_top_p(lg2.clone(), [0, 2], [0.7, 1.0])
    assert torch.isfinite(masked[0]).tolist() == [False, False, True, True]
    assert int(torch.isfinite(masked[1]).sum()) == 2
    assert torch.equal(masked[0, 2:], lg2[0, 2:])


def test_min_tokens_masks_eos_and_stop_ids():
    lg = torch.zeros(1, V)
    lg[0, 7] = 10.0  # EOS is by far the most likely
    lg[0, 9] = 9.0  # then a stop id
    lg[0, 11] = 8.0
    r = mk(eos=7, temperature=0, min_tokens=3, stop_token_ids=(9,), outputs=[20])
    ids, _ = Sampler()(lg, [r])
    assert ids == [11]
    r = mk(eos=7, temperature=1.0, seed=0, min_tokens=3, stop_token_ids=(9,), outputs=[20, 21])
    assert all(t[0] not in (7, 9) for t in draw([r], lg, 50))
    r = mk(eos=7, temperature=0, min_tokens=3, stop_token_ids=(9,), outputs=[20, 21, 22])  # reached
    assert Sampler()(lg, [r])[0] == [7]
    # masks are per row and do not modify the caller's logits
    lg2 = lg.repeat(2, 1)
    ids, _ = Sampler()(lg2, [mk(0, eos=7, temperature=0, min_tokens=2), mk(1, eos=7, temperature=0)])
    assert ids == [9, 7] and lg2[0, 7] == 10.0


def test_logprobs_top_n_sorted_and_match_log_softmax():
    lg = logits(3, seed=4)
    reqs = [mk(0, temperature=0, logprobs=5), mk(1, temperature=1.0, seed=2, logprobs=0), mk(2, temperature=0)]
    ids, lps = Sampler()(lg, reqs)
    ref = torch.log_softmax(lg, -1)
    assert lps[2] is None
    for i in (0, 1):
        lp = lps[i]
        assert lp.token_id == ids[i]
        assert abs(lp.logprob - float(ref[i, ids[i]])) < 1e-5
        assert lp.rank == int((ref[i] > ref[i, ids[i]]).sum()) + 1
    assert lps[0].rank == 1 and lps[1].top == []
    top = lps[0].top
    assert [t for t, _ in top] == ref[0].topk(5).indices.tolist()
    assert all(abs(v - float(ref[0, t])) < 1e-5 for t, v in top)
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)


def test_logprobs_are_of_the_model_distribution_not_the_tempered_one():
    lg = logits(1, seed=5)
    r = mk(temperature=0.3, seed=1, logprobs=2)
    ids, lps = Sampler()(lg, [r])
    assert abs(lps[0].logprob - float(torch.log_softmax(lg, -1)[0, ids[0]])) < 1e-5


def test_logprobs_after_min_tokens_mask():
    lg = logits(1, seed=6)
    lg[0, 7] = 20.0
    r = mk(eos=7, temperature=0, min_tokens=2, logprobs=3)
    ids, lps = Sampler()(lg, [r])
    assert ids[0] != 7 and all(t != 7 for t, _ in lps[0].top)
    assert lps[0].rank == 1


@pytest.mark.parametrize("rank_of", [1, 2, 10, V])
def test_token_logprobs_rank(rank_of):
    lp = torch.log_softmax(torch.arange(V, dtype=torch.float32).flip(0)[None], -1)  # token k has rank k+1
    (tl,) = token_logprobs(lp, torch.tensor([rank_of - 1]), [3])
    assert tl.rank == rank_of and tl.token_id == rank_of - 1
    assert [t for t, _ in tl.top] == [0, 1, 2]


def test_sampling_params_validation():
    for bad in (dict(max_tokens=0), dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_p=0.0),
                dict(top_p=1.5), dict(top_k=-2), dict(min_tokens=40, max_tokens=32), dict(logprobs=21),
                dict(prompt_logprobs=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**{"max_tokens": 32, **bad})
    sp = SamplingParams(stop=("", "x"), stop_token_ids=(1.0,))
    assert sp.stop == ("x",) and sp.stop_token_ids == (1,)
