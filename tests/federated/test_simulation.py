"""End to end on the tiny model: Flower simulation (2 owners, 2 rounds, FLoRA, eps=8) ->
PEFT adapter that loads onto the HF model, reproduces the exported update exactly, and
scores each owner's held-out text exactly as the owners did inside Flower (so FLoRA
owners really accumulated every round's stack in their Context.state)."""

import json
import math

import pytest
import torch

from bastion.federated import lora_math, modeling
from bastion.federated.config import FedConfig

CFG = FedConfig(model="tiny", clients=2, rounds=2, strategy="flora", epsilon=8.0, flora_ranks=(2, 4),
                local_steps=3, batch_size=8, seq_len=48, train_records=64, heldout_records=8, eval_records=4,
                canaries=2, canary_repeats=2, canary_refs=7, lr=5e-3)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from bastion.federated.runner import run

    out = tmp_path_factory.mktemp("adapter")
    run(CFG, out, progress=False)
    return out


def test_report_states_privacy_and_exact_aggregation(run_dir):
    rep = json.loads((run_dir / "training_report.json").read_text())
    owners = rep["privacy"]["per_owner"]
    assert set(owners) == {"0", "1"}
    for o in owners.values():
        assert 7.5 <= o["epsilon_prv"] <= 8.1  # all planned steps were taken
        assert o["epsilon_rdp_crosscheck"] >= o["epsilon_prv"]
        assert math.isclose(o["delta"], 1 / CFG.train_records)
        assert o["noise_multiplier"] > 0
    assert "record" in rep["privacy"]["protects"]["records"]
    err = rep["rounds"][-1]["aggregation_error"]
    assert err["flora_stack"] <= 1e-6 < err["fedavg_of_A_B"]
    comm = rep["communication"]
    assert 0 < comm["max_upload_bytes_per_client_round"] < comm["full_model_bytes"]
    assert rep["utility"]["base_union_perplexity"] > 1 and rep["leakage"]["final_mean_exposure"] >= 0
    assert isinstance(rep["leakage"]["canary_gap_increase_nats"], float)


def test_adapter_loads_with_peft_and_matches_exported_update(run_dir):
    from peft import PeftModel
    from safetensors.torch import load_file

    conf = json.loads((run_dir / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == "SmolLM2-135M-Instruct"
    assert sorted(conf["target_modules"]) == ["q_proj", "v_proj"]
    assert conf["r"] == sum(CFG.flora_ranks) * CFG.rounds and conf["lora_alpha"] == conf["r"]
    factors = load_file(str(run_dir / "adapter_model.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in factors.items() if ".lora_B." in k)  # it learned

    x = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(modeling.load_base("tiny"), str(run_dir)).eval()
    merged = modeling.load_base("tiny")
    modeling.merge_deltas(merged, factors)  # scale 1: alpha == r
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=x).logits, merged(input_ids=x).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(modeling.load_base("tiny")(input_ids=x).logits, merged(input_ids=x).logits)
    assert lora_math.modules_of(factors)  # keys are PEFT's: base_model.model.<module>.lora_A.weight


def test_owners_final_evaluation_matches_the_exported_adapter(run_dir):
    from peft import PeftModel

    from bastion.federated.client import owner_data
    from bastion.federated.train import heldout_nll

    rep = json.loads((run_dir / "training_report.json").read_text())
    model = PeftModel.from_pretrained(modeling.load_base("tiny"), str(run_dir)).eval()
    for owner in range(CFG.clients):
        nll, tokens = heldout_nll(model, owner_data(CFG, owner).heldout)
        reported = rep["utility"]["final_perplexity_per_owner"][str(owner)]["perplexity"]
        assert math.isclose(math.exp(nll / tokens), reported, rel_tol=1e-4)
        assert reported != rep["utility"]["base_perplexity_per_owner"][str(owner)]["perplexity"]
