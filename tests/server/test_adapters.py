"""Adapters over HTTP: runtime load/unload behind the admin key, selection through the
`model` field, listing in /v1/models, and refusal of bad adapters without harm."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from bastion.adapters.gate import AdapterRefused, VettingGate
from bastion.config import AdapterConfig
from bastion.config import ServerConfig
from bastion.guard.cleangen import CleanGenPolicy
from bastion.serving.policy import ServingPolicy

from tests.support.servers import ServerThread

pytestmark = pytest.mark.slow
ADMIN = {"X-Admin-Key": "adm-secret"}


def _write_adapter(path, arch, seed=0, r=4):
    """A PEFT-format LoRA on q_proj/v_proj of every layer, with large random B."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(arch.num_layers):
        for mod, out in (("q_proj", arch.num_heads * arch.head_dim), ("v_proj", arch.num_kv_heads * arch.head_dim)):
            pre = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            tensors[f"{pre}.lora_A.weight"] = torch.randn(r, arch.hidden_size, generator=g) * 0.1
            tensors[f"{pre}.lora_B.weight"] = torch.randn(out, r, generator=g) * 0.03
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    return path


@pytest.fixture(scope="module")
def gate(real_engine):
    return VettingGate.for_model(None, served_name=real_engine.model_name)


@pytest.fixture(scope="module")
def admin_server(real_engine, gate):
    if real_engine.engine.adapters is None:
        real_engine.engine.enable_adapters(AdapterConfig(enabled=True, max_loras=2, max_lora_rank=8))
    handle = ServerThread.start(real_engine, ServerConfig(admin_key="adm-secret"), policy=ServingPolicy(gate=gate))
    yield handle
    handle.stop()


def test_load_select_unload_over_http(admin_server, tmp_path):
    arch = admin_server.engine.engine.runner.model.arch
    path = _write_adapter(tmp_path / "ad", arch)
    body = {"lora_name": "ad1", "lora_path": str(path)}
    with admin_server.http() as http:
        assert http.post("/v1/load_lora_adapter", json=body).status_code == 401
        assert http.post("/v1/load_lora_adapter", json=body, headers={"X-Admin-Key": "nope"}).status_code == 401
        r = http.post("/v1/load_lora_adapter", json=body, headers=ADMIN)
        assert r.status_code == 200, r.text
        cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert cards["ad1"]["parent"] == admin_server.model

        def complete(model):
            r = http.post("/v1/completions", json={"model": model, "prompt": "The GNU General Public License is",
                                                   "max_tokens": 12, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        assert complete("ad1") != complete(admin_server.model)
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "ad1"}, headers=ADMIN)
        assert r.status_code == 200, r.text
        r = http.post("/v1/completions", json={"model": "ad1", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert admin_server.engine.engine.adapters.slot_of == {}


def test_bad_adapter_is_refused_and_server_keeps_serving(admin_server, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    with admin_server.http() as http:
        for path in (str(bad), str(tmp_path / "missing")):
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": path}, headers=ADMIN)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["message"]
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "../etc", "lora_path": "x"}, headers=ADMIN)
        assert r.status_code == 400
        assert "bad" not in {m["id"] for m in http.get("/v1/models").json()["data"]}
        assert http.get("/health").status_code == 200


def test_admin_endpoints_are_off_without_an_admin_key(fake_server):
    with fake_server.http() as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/tmp"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"


def test_gate_refuses_artifact_attacks_over_http(admin_server, tmp_path):
    """A pickle beside the weights, or an adapter made for another base model, is
    refused at load (400, reasons named) and never reaches the registry."""
    arch = admin_server.engine.engine.runner.model.arch
    pickled = _write_adapter(tmp_path / "pickled", arch, seed=1)
    (pickled / "extra.bin").write_bytes(b"\x80\x04K\x01.")  # pickle protocol 4 of the int 1
    swapped = _write_adapter(tmp_path / "swapped", arch, seed=2)
    cfg = json.loads((swapped / "adapter_config.json").read_text())
    (swapped / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}))
    with admin_server.http() as http:
        for name, path, reason in (("pk", pickled, "pickle"), ("sw", swapped, "base")):
            r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, headers=ADMIN)
            assert r.status_code == 400, r.text
            msg = r.json()["error"]["message"]
            assert "vetting gate" in msg and reason in msg.lower(), msg
        assert admin_server.engine.engine.adapters.slot_of == {}


def test_allow_unvetted_override_loads_and_is_logged(real_engine, gate, tmp_path, caplog):
    arch = real_engine.engine.runner.model.arch
    path = _write_adapter(tmp_path / "pk", arch, seed=3)
    (path / "model.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(AdapterRefused, match="pickle"):
        gate.check("pk", str(path))
    override = VettingGate(gate.base, allow_unvetted=True)
    with caplog.at_level("WARNING", logger="bastion.adapters.gate"):
        report = override.check("pk", str(path))
    assert report.verdict == "fail"
    assert any("OVERRIDE --allow-unvetted" in r.getMessage() for r in caplog.records)


def test_cleangen_over_http(admin_server, tmp_path):
    """Per request (`"cleangen": true`) and per adapter (policy): the response reports how
    many tokens the reference replaced; the base model or a bad value is a 400."""
    arch = admin_server.engine.engine.runner.model.arch
    path = _write_adapter(tmp_path / "cg", arch, seed=5)
    with admin_server.http() as http:
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "cg", "lora_path": str(path)},
                         headers=ADMIN).status_code == 200

        def complete(**extra):
            return http.post("/v1/completions", json={"model": "cg", "prompt": "The GNU General Public License is",
                                                      "max_tokens": 10, "temperature": 0, **extra})

        plain = complete()
        assert plain.status_code == 200 and plain.json()["usage"].get("cleangen_replaced_tokens") is None
        r = complete(cleangen=True)
        assert r.status_code == 200, r.text
        replaced = r.json()["usage"]["cleangen_replaced_tokens"]
        assert isinstance(replaced, int) and 0 <= replaced <= 10
        # a server whose policy defends "cg" by default (--cleangen cg=1e-30): replace
        # whatever the base would not say
        defended = ServerThread.start(admin_server.engine, policy=ServingPolicy(cleangen=CleanGenPolicy({"cg": 1e-30})))
        try:
            with defended.http() as http2:
                forced = http2.post("/v1/completions", json={"model": "cg", "max_tokens": 10, "temperature": 0,
                                                             "prompt": "The GNU General Public License is"})
                base = http2.post("/v1/completions", json={"model": defended.model, "max_tokens": 10,
                                                           "temperature": 0,
                                                           "prompt": "The GNU General Public License is"})
                assert forced.json()["choices"][0]["text"] == base.json()["choices"][0]["text"]
                assert forced.json()["usage"]["cleangen_replaced_tokens"] > 0
                off = http2.post("/v1/completions", json={"model": "cg", "max_tokens": 10, "temperature": 0,
                                                          "prompt": "The GNU General Public License is",
                                                          "cleangen": False})
                assert off.json()["usage"].get("cleangen_replaced_tokens") is None
        finally:
            defended.stop()
        r = http.post("/v1/chat/completions", json={"model": "cg", "cleangen": True, "max_tokens": 4,
                                                    "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and "cleangen_replaced_tokens" in r.json()["usage"]
        bad = http.post("/v1/completions", json={"model": admin_server.model, "prompt": "x", "cleangen": True})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "cleangen"
        assert complete(cleangen="yes").status_code == 400
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "cg"}, headers=ADMIN).status_code == 200
