"""Opacus per-sample gradients are exact on PEFT LoRA layers of an HF Llama; DP-SGD touches
only LoRA parameters and really adds noise."""

import torch

from bastion.federated import modeling
from bastion.federated.train import local_train, per_sample_nll

TARGETS = ("q_proj", "v_proj")


def _peft(seed=0):
    torch.manual_seed(seed)
    model = modeling.load_base("tiny")
    shapes = modeling.linear_shapes(model.config, TARGETS)
    weights = modeling.init_lora(shapes, 4, seed)
    weights = {k: (torch.randn_like(v) * 0.1 if ".lora_B." in k else v) for k, v in weights.items()}
    return modeling.add_lora(model, TARGETS, 4, 8.0, weights)


def test_opacus_per_sample_grads_match_one_sample_backward():
    from opacus import GradSampleModule

    peft = _peft()
    x = torch.randint(0, 257, (3, 12), generator=torch.Generator().manual_seed(1))
    gsm = GradSampleModule(peft, batch_first=True, loss_reduction="mean")
    per_sample_nll(gsm, x).mean().backward()
    params = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    assert params and all(".lora_" in n for n in params)
    opacus = {n: p.grad_sample.clone() for n, p in params.items()}  # [3, *shape]
    gsm._close()
    for i in range(3):
        for p in params.values():
            p.grad = None
        per_sample_nll(peft, x[i : i + 1]).sum().backward()
        for n, p in params.items():
            torch.testing.assert_close(opacus[n][i], p.grad, rtol=1e-4, atol=1e-6)


def test_dp_training_changes_only_lora_and_noise_matters():
    x = torch.randint(0, 257, (64, 12), generator=torch.Generator().manual_seed(2))
    runs = {}
    for sigma in (0.0, 2.0):
        peft = _peft()
        base = {n: p.clone() for n, p in peft.named_parameters() if not p.requires_grad}
        local_train(peft, x, steps=3, batch_size=8, lr=1e-2, noise_multiplier=sigma, max_grad_norm=0.5,
                    private=True, seed=3)
        assert all(torch.equal(p, base[n]) for n, p in peft.named_parameters() if not p.requires_grad)
        runs[sigma] = modeling.get_lora(peft)
    start = modeling.get_lora(_peft())
    assert any(not torch.equal(runs[0.0][k], start[k]) for k in start)  # it trained
    assert any(not torch.allclose(runs[0.0][k], runs[2.0][k]) for k in start)  # noise was added


def test_micro_batches_give_the_same_step():
    """A Poisson batch split into micro-batches takes the same DP (and non-DP) step as one
    pass: clipped per-record gradients are summed across chunks, noise added once."""
    x = torch.randint(0, 257, (64, 12), generator=torch.Generator().manual_seed(4))
    for private, sigma in ((True, 1.0), (False, 0.0)):
        out = []
        for micro in (64, 3):
            peft = _peft()
            local_train(peft, x, steps=2, batch_size=16, lr=1e-2, noise_multiplier=sigma, max_grad_norm=0.5,
                        private=private, seed=5, micro_batch=micro)
            out.append(modeling.get_lora(peft))
        for k in out[0]:
            torch.testing.assert_close(out[0][k], out[1][k], rtol=1e-4, atol=1e-5)


def test_canary_leakage_pairs_gap_increase_with_the_base_model():
    """gap-increase is the paired per-canary change from the base: zero for the base model
    itself, equal to the difference of mean gaps otherwise; exposure/AUC moments are
    consistent with their means (needed for the pooled standard error)."""
    from bastion.federated.train import canary_gaps, canary_leakage

    gen = torch.Generator().manual_seed(6)
    prefixes = [tuple(torch.randint(0, 256, (5,), generator=gen).tolist()) for _ in range(3)]
    secrets = [tuple(torch.randint(48, 58, (6,), generator=gen).tolist()) for _ in range(3)]
    refs = [tuple(tuple(torch.randint(48, 58, (6,), generator=gen).tolist()) for _ in range(7)) for _ in range(3)]
    base, tuned = _peft(), _peft(seed=1)
    base_gaps = canary_gaps(base, prefixes, secrets, refs, 256)
    same = canary_leakage(base, prefixes, secrets, refs, 256, base_gaps=base_gaps)
    assert same["canaries"] == 3 and same["gap-increase"] == 0.0 and same["gap-increase-sq"] == 0.0
    other = canary_leakage(tuned, prefixes, secrets, refs, 256, base_gaps=base_gaps)
    assert abs(other["gap-increase"] - (other["canary-gap"] - same["canary-gap"])) < 1e-5
    assert other["gap-increase-sq"] > 0 and other["exposure-sq"] >= other["exposure"] ** 2 - 1e-9
    assert 0.0 <= other["canary-auc"] <= 1.0 and "gap-increase" not in canary_leakage(tuned, prefixes, secrets, refs, 256)
