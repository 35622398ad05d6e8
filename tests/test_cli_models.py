"""`bastion models` (issue 21): the embedded GGUF and the local GGUF files / HF model
directories, each with format, size, parameters and quantization read from headers
alone; a bad file is listed with its error, a bad --dir is one line and exit status 2.
The header reader is checked against gguf.GGUFReader and against corrupted files."""

from __future__ import annotations

import json
import os
import random
import struct

import gguf
import numpy as np
import pytest

from bastion.cli import main
from bastion.cli_models import human_bytes, human_count
from bastion.gguf_header import GGUFHeaderError, read_gguf_header
from bastion.model_catalog import (
    EMBEDDED_FILE,
    EMBEDDED_NAME,
    EMBEDDED_PACKAGE,
    embedded_entry,
    list_models,
)

SMOLLM2_PARAMS = 134_515_008


@pytest.fixture(scope="module")
def embedded_path():
    entry = embedded_entry()
    assert entry.error is None, entry.error
    return entry.path


@pytest.fixture(autouse=True)
def no_default_dirs(tmp_path, monkeypatch):
    """The user's own caches never leak into a test."""
    monkeypatch.setenv("BASTION_CACHE", str(tmp_path / "no-bastion-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hub-cache"))


def _tiny_gguf(path, *, file_type=gguf.LlamaFileType.MOSTLY_Q8_0):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_file_type(file_type)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_array("x.nested", [[1, 2], [3]])
    w.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
    q = gguf.quants.quantize(np.ones((8, 64), np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _hf_dir(path, *, n=(4, 8)):
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "max_position_embeddings": 512}))
    save_file({"a": np.zeros(n, np.float16), "b": np.zeros(3, np.float32)}, str(path / "model.safetensors"))
    return path


def _json(capsys, *argv):
    assert main(["models", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_embedded_model_is_what_serve_runs_by_default(embedded_path):
    from bastion.engine.models import loader

    assert (EMBEDDED_PACKAGE, EMBEDDED_FILE, EMBEDDED_NAME) == (
        loader.EMBEDDED_MODEL_PACKAGE, loader.EMBEDDED_MODEL_FILE, loader.EMBEDDED_MODEL_NAME)
    assert embedded_path == str(loader.embedded_model_path())


def test_header_reader_agrees_with_gguf_reader(embedded_path, tmp_path):
    for path in (embedded_path, _tiny_gguf(tmp_path / "tiny.gguf")):
        ours = read_gguf_header(path)
        theirs = gguf.GGUFReader(path)
        assert [(t.name, t.type_name, t.shape) for t in ours.tensors] == [
            (t.name, t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in theirs.tensors]
        assert ours.parameters == sum(int(t.n_elements) for t in theirs.tensors)
        assert ours.architecture == "llama"
    tiny = read_gguf_header(tmp_path / "tiny.gguf")
    assert tiny.metadata["tokenizer.ggml.tokens"] == 3 and tiny.metadata["general.name"] == "tiny"
    assert tiny.quantization == "Q8_0" and tiny.tensor_types() == {"F32": 512, "Q8_0": 512}
    assert tiny.context_length == 256


def test_models_lists_the_embedded_gguf_from_its_header(capsys, embedded_path):
    out = _json(capsys)
    (entry,) = out["models"]
    assert entry == {
        "name": EMBEDDED_NAME, "path": embedded_path, "format": "gguf", "size_bytes": os.path.getsize(embedded_path),
        "default": True, "arch": "llama", "quantization": "Q4_1", "parameters": SMOLLM2_PARAMS,
        "tensor_types": {"Q4_1": 106_168_320, "Q8_0": 28_311_552, "F32": 35_136}, "context_length": 8192,
        "error": None}
    assert out["dirs"] == []
    assert main(["models"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split() == ["NAME", "FORMAT", "ARCH", "QUANT", "PARAMS", "SIZE", "PATH"]
    assert lines[1].split() == [EMBEDDED_NAME, "(default)", "gguf", "llama", "Q4_1", "135M", "94", "MiB", embedded_path]
    assert "no model directory here" in captured.err and "--dir" in captured.err


def test_models_under_a_directory_bad_files_listed_with_their_error(capsys, tmp_path, embedded_path):
    root = tmp_path / "models"
    (root / "family").mkdir(parents=True)
    _tiny_gguf(root / "family" / "tiny.Q8_0.gguf")
    _hf_dir(root / "hf-model")
    (root / "garbage.gguf").write_bytes(b"not a gguf at all")
    (root / "empty.gguf").write_bytes(b"")
    with open(embedded_path, "rb") as f:
        head = f.read(3 << 20)
    (root / "cut-in-header.gguf").write_bytes(head[:200_000])
    (root / "cut-in-data.gguf").write_bytes(head)
    bad_st = _hf_dir(root / "bad-safetensors")
    (bad_st / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    (root / "notes.txt").write_text("not a model")
    os.symlink(root, root / "family" / "loop")  # a loop is visited once
    by_name = {m["name"]: m for m in _json(capsys, "--dir", str(root))["models"]}
    assert set(by_name) == {EMBEDDED_NAME, "family/tiny.Q8_0", "hf-model", "garbage", "empty", "cut-in-header",
                            "cut-in-data", "bad-safetensors"}
    tiny = by_name["family/tiny.Q8_0"]
    assert (tiny["format"], tiny["quantization"], tiny["parameters"], tiny["error"]) == ("gguf", "Q8_0", 1024, None)
    hf = by_name["hf-model"]
    assert (hf["format"], hf["arch"], hf["quantization"], hf["parameters"]) == ("safetensors", "qwen2", "F16", 35)
    assert hf["tensor_types"] == {"F16": 32, "F32": 3} and hf["context_length"] == 512 and hf["error"] is None
    assert "GGUF magic" in by_name["garbage"]["error"] and "GGUF magic" in by_name["empty"]["error"]
    assert "fit" in by_name["cut-in-header"]["error"] or "truncated" in by_name["cut-in-header"]["error"]
    assert "truncated: tensor" in by_name["cut-in-data"]["error"]
    assert "does not fit" in by_name["bad-safetensors"]["error"]
    for name in ("garbage", "cut-in-data", "bad-safetensors"):
        assert by_name[name]["parameters"] is None
    assert main(["models", "--dir", str(root)]) == 0  # the table marks the bad ones
    table = capsys.readouterr().out
    assert "[error: not a GGUF file" in table and "family/tiny.Q8_0" in table


def test_default_dirs_and_the_hub_cache_layout(capsys, tmp_path, monkeypatch):
    cache, hub = tmp_path / "bastion", tmp_path / "hub"
    (cache / "models").mkdir(parents=True)
    _tiny_gguf(cache / "models" / "mine.gguf")
    _hf_dir(hub / "models--org--tiny" / "snapshots" / "0123456789abcdef")
    (hub / "models--org--tiny" / "blobs").mkdir()
    (hub / "datasets--org--data" / "snapshots" / "r").mkdir(parents=True)
    monkeypatch.setenv("BASTION_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    out = _json(capsys)
    assert out["dirs"] == [str(cache / "models"), str(hub)]
    assert [m["name"] for m in out["models"]] == [EMBEDDED_NAME, "mine", "org/tiny"]
    _hf_dir(hub / "models--org--tiny" / "snapshots" / "fedcba9876543210")  # two revisions: told apart
    names = [m["name"] for m in _json(capsys)["models"]]
    assert names == [EMBEDDED_NAME, "mine", "org/tiny@01234567", "org/tiny@fedcba98"]
    # --dir replaces the default directories; a file names itself; the same file is listed once
    gguf_file = str(cache / "models" / "mine.gguf")
    names = [m["name"] for m in _json(capsys, "--dir", gguf_file, "--dir", str(cache / "models"))["models"]]
    assert names == [EMBEDDED_NAME, "mine"]


def test_a_bad_dir_is_one_line_and_exit_2(capsys, tmp_path):
    assert main(["models", "--dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"bastion models: error: --dir {tmp_path / 'nope'}: no such file or directory"]
    (tmp_path / "x.txt").write_text("x")
    assert main(["models", "--dir", str(tmp_path / "x.txt")]) == 2
    assert "not a directory or a .gguf file" in capsys.readouterr().err


def test_corrupted_headers_fail_cleanly(tmp_path):
    """Every truncation and random byte flips of a small GGUF: a header or a
    GGUFHeaderError, never another exception (nor a hang or a huge allocation)."""
    good = _tiny_gguf(tmp_path / "good.gguf").read_bytes()
    rng = random.Random(0)
    path = tmp_path / "bad.gguf"
    cases = [good[:n] for n in range(0, len(good), 7)]
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(0, 600)] = rng.randrange(256)
        cases.append(bytes(data))
    errors = 0
    for data in cases:
        path.write_bytes(data)
        try:
            read_gguf_header(path)
        except GGUFHeaderError:
            errors += 1
    assert errors > len(cases) // 3
    entries = list_models([path])  # the catalog turns them into entries with an error
    assert entries[-1].path == str(path)


def test_human_units():
    assert [human_count(n) for n in (None, 999, 1500, SMOLLM2_PARAMS, 7_241_732_096)] == [
        "-", "999", "1.5K", "135M", "7.2B"]
    assert [human_bytes(n) for n in (None, 8, 2048, 98_362_432, 4 * 2**30)] == ["-", "8 B", "2.0 KiB", "94 MiB",
                                                                                   "4.0 GiB"]
