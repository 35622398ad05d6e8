"""Aggregation oracles: FLoRA stacking is exact for mixed ranks, FedAvg of A,B is not."""

import pytest
import torch

from bastion.federated import lora_math


def _clients(ranks, out_f=48, in_f=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{f"m{j}.lora_A.weight": torch.randn(r, in_f, generator=gen),
             f"m{j}.lora_B.weight": torch.randn(out_f, r, generator=gen)} for r in ranks for j in [0]]


@pytest.mark.parametrize("ranks", [(2, 4, 8, 16), (1, 3), (8, 8, 8)])
def test_flora_stack_equals_weighted_sum_of_products(ranks):
    clients = _clients(ranks)
    weights = [w / sum(range(1, len(ranks) + 1)) for w in range(1, len(ranks) + 1)]
    scales = [16.0 / r for r in ranks]
    ideal = lora_math.ideal_delta(clients, scales, weights)  # float64 oracle
    stack = lora_math.flora_stack(clients, scales, weights)
    assert stack["m0.lora_A.weight"].shape == (sum(ranks), 40)
    assert stack["m0.lora_B.weight"].shape == (48, sum(ranks))
    assert lora_math.relative_error(lora_math.product(stack), ideal) <= 1e-6


def test_fedavg_of_a_b_is_not_exact_but_ffa_is():
    ranks = (4, 4, 4)
    clients = _clients(ranks)
    w = [1 / 3] * 3
    ideal = lora_math.ideal_delta(clients, [4.0] * 3, w)
    avg = lora_math.fedavg(clients, w)
    assert lora_math.relative_error(lora_math.product(avg, 4.0), ideal) > 0.1
    # FFA-LoRA: shared frozen A -> averaging B is exact
    shared_a = clients[0]["m0.lora_A.weight"]
    ffa = [{"m0.lora_A.weight": shared_a, "m0.lora_B.weight": c["m0.lora_B.weight"]} for c in clients]
    ideal_ffa = lora_math.ideal_delta(ffa, [4.0] * 3, w)
    avg_ffa = lora_math.fedavg(ffa, w)
    assert lora_math.relative_error(lora_math.product(avg_ffa, 4.0), ideal_ffa) <= 1e-6


def test_fedavg_pads_heterogeneous_ranks():
    avg = lora_math.fedavg(_clients((2, 6)), [0.5, 0.5])
    assert avg["m0.lora_A.weight"].shape == (6, 40) and avg["m0.lora_B.weight"].shape == (48, 6)


def test_concat_rounds_and_svd_truncation():
    r1 = lora_math.flora_stack(_clients((2, 4), seed=1), [1.0, 1.0], [0.5, 0.5])
    r2 = lora_math.flora_stack(_clients((2, 4), seed=2), [1.0, 1.0], [0.5, 0.5])
    both = lora_math.concat_rounds([r1, r2])
    want = {m: lora_math.product(r1)[m] + lora_math.product(r2)[m] for m in lora_math.product(r1)}
    assert lora_math.relative_error(lora_math.product(both), want) <= 1e-6
    exact, err = lora_math.svd_truncate(both, 12)  # true rank 12: lossless
    assert err <= 1e-5 and lora_math.relative_error(lora_math.product(exact), want) <= 1e-5
    lossy, err4 = lora_math.svd_truncate(both, 4)
    assert lossy["m0.lora_A.weight"].shape == (4, 40) and 0.01 < err4 < 1.0
