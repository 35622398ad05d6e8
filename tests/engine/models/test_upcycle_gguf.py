"""upcycle.save_gguf (the MoE benchmark's quantized-expert model, `bench moe --experts`):
the file reads back as the Mixtral it describes, every non-expert tensor exact (q/k through
llama.cpp's row permutation and back), the experts as gguf's own Q8_0 rounding of the dense
MLP; so its logits equal the dense model's with those rounded MLPs (the upcycling oracle)."""

from __future__ import annotations

import types

import gguf
import numpy as np
import torch

from bastion.engine.models.loader import load_checkpoint
from bastion.engine.models.upcycle import save_gguf, upcycle
from tests.support.engines import build_model, one_shot_logits, randomize


def test_upcycled_gguf_reads_back_and_equals_the_dense_model_with_rounded_mlps(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    randomize(hf, 4)
    hf.save_pretrained(str(tmp_path / "dense"))
    dense = load_checkpoint(str(tmp_path / "dense"), show_progress=False)
    mcfg, w = upcycle(dense.arch, dense.weights, num_experts=4, top_k=2, seed=1, router_std=3.0)
    save_gguf(tmp_path / "moe.gguf", mcfg, w, "Q8_0")
    got = load_checkpoint(str(tmp_path / "moe.gguf"), show_progress=False, quantize="none")
    a = got.arch
    assert (a.model_type, a.num_experts, a.num_experts_per_tok, a.tie_word_embeddings) == ("mixtral", 4, 2, True)
    q8 = gguf.GGMLQuantizationType.Q8_0
    rounded = dict(dense.weights)
    for name, t in w.items():
        if ".experts." not in name:
            assert torch.equal(got.weights[name], t), name
            continue
        want = np.asarray(gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), q8), q8)).reshape(t.shape)
        assert torch.equal(got.weights[name], torch.from_numpy(want)), name
        layer, e, proj = name.split(".")[2], name.split(".")[5], name.split(".")[6]
        if e == "0":
            rounded[f"model.layers.{layer}.mlp.{proj}.weight"] = got.weights[name]
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = one_shot_logits(build_model(types.SimpleNamespace(arch=dense.arch, weights=rounded), torch.float32, 128), ids)
    moe = one_shot_logits(build_model(got, torch.float32, 128), ids)
    assert float(ref.std()) > 0.1 and float((moe - ref).abs().max()) <= 1e-4
