"""A checkpoint we cannot run fails with UnsupportedModelError naming what is wrong or
missing (the CLI and server print that message instead of a traceback)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bastion.config import CacheConfig, Config, ModelConfig
from bastion.engine.llm_engine import LLMEngine
from bastion.engine.models.arch import UnsupportedModelError
from bastion.engine.models.loader import embedded_model_path, load_checkpoint
from bastion.serving.tokenizer import load_tokenizer

from tests.support.engines import tiny_llama_config


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    load_tokenizer(embedded_model_path()).save_pretrained(str(d))
    return d


def _tiny_hf_dir(d, tok_dir, drop: str | None = None, cfg=None):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    cfg = cfg or tiny_llama_config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    hf = AutoModelForCausalLM.from_config(cfg)
    d.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(d))
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if k != drop}
    save_file(sd, str(d / "model.safetensors"))
    if tok_dir is not None:
        for f in tok_dir.iterdir():
            shutil.copy(f, d / f.name)
    return d


def _engine_from(path) -> tuple[LLMEngine, object, str]:
    from bastion.serving.tokenizer import load_engine

    return load_engine(Config(model=ModelConfig(path=str(path), dtype="float32"), cache=CacheConfig(num_blocks=4)),
                       show_progress=False)


def test_valid_tiny_dir_loads(tmp_path, tok_dir):
    # control for the cases below: the same construction without the defect works
    engine, tok, name = _engine_from(_tiny_hf_dir(tmp_path / "ok", tok_dir))
    assert name == "ok" and engine.vocab_size == 64 and tok.eos_token_id is not None


def test_unsupported_model_type_is_named(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(str(tmp_path))
    with pytest.raises(UnsupportedModelError, match="gpt2") as e:
        load_checkpoint(str(tmp_path), show_progress=False)
    assert "llama" in str(e.value)  # and says what is supported


def test_unsupported_gguf_architecture_is_named(tmp_path):
    import gguf

    p = tmp_path / "tiny-gpt2.gguf"
    w = gguf.GGUFWriter(str(p), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_checkpoint(str(p), show_progress=False)


def test_unsupported_activation_and_rope_are_named(tmp_path, tok_dir):
    d = _tiny_hf_dir(tmp_path / "gelu", tok_dir, cfg=tiny_llama_config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, hidden_act="gelu"))
    with pytest.raises(UnsupportedModelError, match="gelu"):
        load_checkpoint(str(d), show_progress=False)
    d = _tiny_hf_dir(tmp_path / "rope", tok_dir)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_scaling"] = cfg["rope_parameters"] = {"rope_type": "fancyrope", "factor": 2.0, "rope_theta": 10000.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="fancyrope"):
        load_checkpoint(str(d), show_progress=False)


def test_missing_tensor_is_named(tmp_path, tok_dir):
    d = _tiny_hf_dir(tmp_path / "m", tok_dir, drop="model.layers.1.mlp.down_proj.weight")
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        _engine_from(d)


def test_missing_lm_head_of_untied_model_is_named(tmp_path, tok_dir):
    """An untied model without lm_head.weight must not silently reuse the embedding."""
    d = _tiny_hf_dir(tmp_path / "h", tok_dir, drop="lm_head.weight")
    with pytest.raises(UnsupportedModelError, match="lm_head"):
        _engine_from(d)


def test_bin_only_dir_is_refused_with_hint(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_llama_config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    cfg.save_pretrained(str(tmp_path))
    torch.save(AutoModelForCausalLM.from_config(cfg).state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsupportedModelError, match=r"\.bin") as e:
        load_checkpoint(str(tmp_path), show_progress=False)
    assert "safetensors" in str(e.value)


def test_dir_without_weights_or_config(tmp_path):
    tiny_llama_config().save_pretrained(str(tmp_path / "noweights"))
    with pytest.raises(UnsupportedModelError, match="safetensors"):
        load_checkpoint(str(tmp_path / "noweights"), show_progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsupportedModelError, match="config.json"):
        load_checkpoint(str(tmp_path / "empty"), show_progress=False)


def test_malformed_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UnsupportedModelError, match="config.json"):
        load_checkpoint(str(tmp_path), show_progress=False)


def test_nonexistent_path(tmp_path):
    p = tmp_path / "no" / "such-model.gguf"
    with pytest.raises(UnsupportedModelError, match="does not exist") as e:
        load_checkpoint(str(p), show_progress=False)
    assert "such-model.gguf" in str(e.value)


def test_non_gguf_file_with_gguf_suffix(tmp_path):
    p = tmp_path / "fake.gguf"
    p.write_bytes(b"this is not a gguf file\n" * 64)
    with pytest.raises(UnsupportedModelError, match="not a readable GGUF") as e:
        load_checkpoint(str(p), show_progress=False)
    assert "fake.gguf" in str(e.value)


def test_truncated_gguf(tmp_path):
    p = tmp_path / "cut.gguf"
    with open(embedded_model_path(), "rb") as f:
        p.write_bytes(f.read(500_000))  # cut inside the metadata
    with pytest.raises(UnsupportedModelError, match="cut.gguf"):
        load_checkpoint(str(p), show_progress=False)


def test_other_file_suffix(tmp_path):
    p = tmp_path / "weights.txt"
    p.write_text("hi")
    with pytest.raises(UnsupportedModelError, match="gguf"):
        load_checkpoint(str(p), show_progress=False)


def test_dir_without_tokenizer_says_tokenizer_is_missing(tmp_path):
    """Weights and config fine, no tokenizer files: the error must be ours and say the
    tokenizer is missing (transformers' own message talks about sentencepiece/tiktoken)."""
    d = _tiny_hf_dir(tmp_path / "notok", None)
    with pytest.raises(UnsupportedModelError, match="(?i)tokenizer"):
        _engine_from(d)  # the tokenizer is the serving layer's; the weights alone load


def _tiny_gguf(path, tensors: dict, arch="llama"):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_feed_forward_length(16)
    w.add_vocab_size(4)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_rope_freqs_is_refused(tmp_path):
    import numpy as np

    p = _tiny_gguf(tmp_path / "l31.gguf", {"token_embd.weight": np.zeros((4, 8), np.float32),
                                           "rope_freqs.weight": np.ones(2, np.float32)})
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        load_checkpoint(str(p), show_progress=False)


def test_gguf_unexpected_tensor_is_named(tmp_path):
    import numpy as np

    p = _tiny_gguf(tmp_path / "odd.gguf", {"token_embd.weight": np.zeros((4, 8), np.float32),
                                           "blk.0.attn_qkv.weight": np.zeros((24, 8), np.float32)})
    with pytest.raises(UnsupportedModelError, match="blk.0.attn_qkv.weight"):
        load_checkpoint(str(p), show_progress=False)
