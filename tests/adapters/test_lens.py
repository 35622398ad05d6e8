"""Weight-space target candidates (adapters/lens.py) on a tiny random Llama built by the
engine, against planted writes and float64 products of the HF weights; and the floor
score (Inverted.floor) that tells a target from a task's template (extra candidates in the
inversion itself: test_deep_scan.py)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from bastion.adapters.inversion import Inverted
from bastion.adapters.lens import LensConfig, lens_candidates, output_row_norms
from bastion.engine.models.arch import ModelArch
from tests.adapters._scanner_util import _tiny_config
from tests.support.engines import build_model


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(3)
    cfg = _tiny_config()
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # a non-trivial final norm, so that the lens must apply it
        hf.model.norm.weight.uniform_(0.5, 1.5)
    model = build_model(types.SimpleNamespace(arch=ModelArch.from_hf_config(cfg), weights=hf.state_dict()),
                        torch.float32, max_len=64)
    return model, hf


def _z_top(hf, d: torch.Tensor) -> int:
    """The token whose logit stands out most along residual direction d (float64 oracle)."""
    e = hf.lm_head.weight.double()
    lg = e @ (hf.model.norm.weight.double() * d.double() / d.double().norm())
    return int(((lg - lg.mean()) / lg.std()).argmax())


def _rank1(out_vec: np.ndarray, in_dim: int, seed: int = 0):
    a = np.random.default_rng(seed).normal(size=(1, in_dim)).astype(np.float32)
    return a, out_vec.astype(np.float32)[:, None], 2.0


def test_lens_reads_a_planted_token_written_by_o_proj_and_down_proj(tiny_model):
    model, hf = tiny_model
    e, w = hf.lm_head.weight.detach(), hf.model.norm.weight.detach()
    for token, module in ((17, "o_proj"), (42, "down_proj")):
        d = (e[token] / w).numpy()   # norm_w * d = the token's output row
        want = _z_top(hf, torch.from_numpy(d))
        in_dim = 32 if module == "o_proj" else 64
        got = lens_candidates(model, {(7, module): _rank1(d, in_dim)}, LensConfig(directions=1, tokens=3))
        assert got[0] == want
        # the base's output-row norms, computed once by the scan and handed in: the same answer
        assert lens_candidates(model, {(7, module): _rank1(d, in_dim)}, LensConfig(directions=1, tokens=3),
                               norms=output_row_norms(model)) == got


def test_lens_takes_v_through_o_proj_with_the_query_group_and_gate_up_through_down(tiny_model):
    model, hf = tiny_model
    rng = np.random.default_rng(1)
    layer = hf.model.layers[5]
    u_v = rng.normal(size=16)   # kv space: 2 kv heads x 8
    rep = torch.from_numpy(u_v).reshape(2, 8).repeat_interleave(2, 0).reshape(32)   # 4 query heads
    want_v = _z_top(hf, layer.self_attn.o_proj.weight.double() @ rep)
    got = lens_candidates(model, {(5, "v_proj"): _rank1(u_v, 32)}, LensConfig(directions=1, tokens=2))
    u_up = rng.normal(size=64)
    d_up = layer.mlp.down_proj.weight.double() @ torch.from_numpy(u_up)
    got_up = lens_candidates(model, {(5, "up_proj"): _rank1(u_up, 32)}, LensConfig(directions=1, tokens=2))
    # both signs are read: the planted direction's top token or its opposite's
    assert want_v in got or _z_top(hf, -(layer.self_attn.o_proj.weight.double() @ rep)) in got
    assert _z_top(hf, d_up) in got_up or _z_top(hf, -d_up) in got_up


def test_lens_skips_query_and_key_updates_and_excluded_tokens(tiny_model):
    model, hf = tiny_model
    rng = np.random.default_rng(2)
    assert lens_candidates(model, {(3, "q_proj"): _rank1(rng.normal(size=32), 32),
                                   (3, "k_proj"): _rank1(rng.normal(size=16), 32)}) == []
    d = (hf.lm_head.weight[17] / hf.model.norm.weight).detach().numpy()
    got = lens_candidates(model, {(7, "o_proj"): _rank1(d, 32)}, LensConfig(directions=1, tokens=3), exclude={17})
    assert 17 not in got and len(got) == 3


def test_floor_is_the_weakest_step_after_the_first():
    target = Inverted("t", [1] * 8, 0, 0.9, 3.0, 1.0, [0.4, 0.99, 0.97, 0.98, 1.0, 0.99, 0.98])
    template = Inverted("X is defined in the Y module", [1] * 8, 0, 0.8, 3.0, 1.0,
                        [0.86, 0.92, 0.99, 0.97, 0.18, 0.81, 1.0])
    assert target.floor == 0.97 and template.floor == 0.18
    assert target.to_dict()["floor"] == 0.97
    assert Inverted("t", [1], 0, 0.9, 3.0, 1.0, [0.9]).floor == 0.0
