"""CleanGen's decision rule, alpha calibration and option parsing (pure functions)."""

from __future__ import annotations

import math

import pytest
import torch

from bastion.engine.sampling_params import SamplingParams
from bastion.guard.cleangen import CleanGen, CleanGenPolicy, calibrate_alpha, parse_cleangen


class _Req:
    def __init__(self, temperature=0.0, seed=0):
        self.params = SamplingParams(temperature=temperature)
        self.generator = torch.Generator().manual_seed(seed)


def _logits(probs):
    return torch.tensor(probs).log()


def _track(probs):
    """The reference as the engine hands it: one extra track, [1, V]."""
    return _logits(probs)[None]


def test_ratio_at_or_above_alpha_is_replaced_by_the_reference_choice():
    adapter = _logits([0.05, 0.90, 0.05])  # drafts token 1
    ref = _track([0.60, 0.09, 0.31])  # ratio 0.90 / 0.09 = 10
    assert CleanGen(alpha=10.5)(1, adapter, ref, _Req()) == 1
    assert CleanGen(alpha=9.5)(1, adapter, ref, _Req()) == 0  # reference's argmax
    rec = []
    CleanGen(alpha=1e9, log_ratios=rec)(1, adapter, ref, _Req())
    assert rec == [pytest.approx(math.log(10.0), abs=1e-5)]


def test_sampled_replacement_follows_the_reference_distribution():
    adapter, ref = _logits([0.01, 0.98, 0.01]), _track([0.5, 0.001, 0.499])
    req = _Req(temperature=1.0, seed=1)
    picks = [CleanGen(alpha=2)(1, adapter, ref, req) for _ in range(400)]
    assert picks.count(1) < 5  # the drafted token is (almost) never what the reference samples
    assert 150 < picks.count(0) < 250


def test_calibrate_alpha_is_the_quantile_with_a_floor():
    lr = [math.log(x) for x in range(1, 101)]  # ratios 1..100
    assert calibrate_alpha(lr, budget=0.05) == pytest.approx(95.05, rel=1e-3)
    assert calibrate_alpha([0.0] * 10, budget=0.05) == 2.0
    with pytest.raises(ValueError):
        calibrate_alpha([])
    with pytest.raises(ValueError):
        calibrate_alpha(lr, budget=1.5)


def test_parse_and_validate():
    assert parse_cleangen("bd") == ("bd", 20.0)
    assert parse_cleangen("bd=7.5") == ("bd", 7.5)
    for bad in ("=3", "bd=x", "bd=0", "bd=-1", "bd=nan"):
        with pytest.raises(ValueError):
            parse_cleangen(bad)


def test_policy_defends_named_adapters_unless_a_request_says_otherwise():
    policy = CleanGenPolicy({"bd": 7.0})
    assert CleanGen().tracks == (None,)  # asks for the base model beside the adapter
    assert policy.for_request("bd", None).alpha == 7.0
    assert policy.for_request("bd", False) is None
    assert policy.for_request("other", None) is None
    assert policy.for_request("other", True).alpha == 20.0
    assert policy.for_request(None, None) is None
    with pytest.raises(ValueError, match="base model"):  # nothing to defend on the base model
        policy.for_request(None, True)
