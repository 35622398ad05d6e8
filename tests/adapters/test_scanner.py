"""The adapter vetting gate, artifact side: a real PEFT adapter of a tiny random Llama
passes with hashes and weight statistics; every attack on the files themselves (pickles,
code, special files, size limits, malformed or overlapping safetensors headers, chat
template and tokenizer injection) is refused with a finding that names the problem; the
CLI's exit codes. Config, tensor and weight checks are in test_scanner_config_weights.py.

One PEFT adapter is built per module (conftest.py, real `save_pretrained`), each test
mutates a copy.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

from bastion.adapters.cli import add_scan_parser, load_base_info
from bastion.adapters.scanner import Finding, ScanLimits, scan_adapter

from tests.adapters._scanner_util import LAYERS, PREFIX, _assert_refused, _edit_config, _raw, _scan, _tensors, _write_raw


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
    base = load_base_info(None, weight_norms=False)  # the embedded model is part of the install
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
