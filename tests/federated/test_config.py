import math

import pytest

from bastion.federated.config import FedConfig


def test_record_roundtrip_keeps_inf_and_tuples():
    cfg = FedConfig(epsilon=math.inf, flora_ranks=(2, 8), target_modules=("q_proj", "down_proj"))
    again = FedConfig.from_record(cfg.to_record())
    assert again == cfg and not again.private
    assert FedConfig.from_record({"local-steps": "3", "epsilon": "8"}).local_steps == 3


@pytest.mark.parametrize("kwargs, needle", [
    ({"strategy": "sgd"}, "strategy"), ({"epsilon": 0.0}, "epsilon"), ({"clients": 1}, "clients"),
    ({"target_modules": ("wq",)}, "target_modules"), ({"flora_ranks": (0,)}, "flora_ranks"),
    ({"client_dp_noise": 1.0, "strategy": "flora"}, "FLoRA"), ({"rank": 0}, "rank"),
    ({"lora_layers": -1}, "lora_layers"), ({"epsilon": 1000.0}, "epsilon"), ({"epsilon": math.nan}, "epsilon"),
])
def test_bad_values_raise_valueerror_naming_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        FedConfig(**kwargs)


def test_unknown_run_config_key_rejected():
    with pytest.raises(ValueError, match="unknown"):
        FedConfig.from_record({"epochs": 3})


def test_heterogeneous_ranks_only_for_flora():
    assert [FedConfig(strategy="flora", flora_ranks=(2, 8)).client_rank(i) for i in range(3)] == [2, 8, 2]
    assert FedConfig(strategy="fedavg", rank=4).client_rank(1) == 4


def test_which_strategies_train_a():
    """A is trained by fedavg always, by ffa never, by flora unless flora_freeze_a (default)."""
    assert FedConfig(strategy="fedavg").trains_a and not FedConfig(strategy="ffa").trains_a
    assert not FedConfig(strategy="flora").trains_a and FedConfig(strategy="flora", flora_freeze_a=False).trains_a
    cfg = FedConfig(flora_freeze_a=False, lora_layers=4)
    assert FedConfig.from_record(cfg.to_record()) == cfg
    assert FedConfig.from_record({"flora-freeze-a": "false"}).flora_freeze_a is False
