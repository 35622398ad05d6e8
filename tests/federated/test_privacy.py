import math

import pytest

from bastion.federated import privacy


@pytest.mark.parametrize("eps", [8.0, 2.0])
def test_calibrated_sigma_spends_the_target_and_rdp_is_looser(eps):
    plan = privacy.plan(eps, 256, 16, 12)
    assert plan.delta == 1 / 256 and plan.sample_rate == 16 / 256
    prv = privacy.epsilon_prv(plan.noise_multiplier, plan.sample_rate, 12, plan.delta)
    rdp = privacy.epsilon_rdp(plan.noise_multiplier, plan.sample_rate, 12, plan.delta)
    assert abs(prv - eps) <= 0.05 * eps
    assert rdp >= prv * 0.99  # RDP is an upper bound; PRV is (numerically) tight


def test_tighter_epsilon_needs_more_noise_and_inf_means_none():
    assert privacy.plan(2.0, 256, 16, 12).noise_multiplier > privacy.plan(8.0, 256, 16, 12).noise_multiplier
    assert privacy.plan(math.inf, 256, 16, 12).noise_multiplier == 0.0
    assert math.isinf(privacy.epsilon_prv(0.0, 0.1, 10, 1e-3))


def test_epsilon_grows_with_steps():
    plan = privacy.plan(4.0, 256, 16, 20)
    half = privacy.epsilon_prv(plan.noise_multiplier, plan.sample_rate, 10, plan.delta)
    assert half < privacy.epsilon_prv(plan.noise_multiplier, plan.sample_rate, 20, plan.delta)
