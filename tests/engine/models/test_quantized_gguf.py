"""Random Llama-shaped GGUFs (bench/gguf_gen.py) through the loader: the quantized path
(codes repacked, q/k rows permuted as QuantWeights) gives the dense path's logits (every
weight dequantized by gguf-py), for each kept type; fp (F16) files stay dense under
auto and are quantized group-wise under --quantize int8/int4, within that quantization's
error of the dense logits; resident bytes stay near the file's."""

from __future__ import annotations

import pytest
import torch

from bastion.bench.gguf_gen import write_random_gguf
from bastion.engine.models.loader import load_checkpoint
from bastion.engine.models.quant_linear import QuantLinear, load_qkernel
from bastion.engine.models.quantized_model import build_quantized, has_quantized, resident_bytes

from tests.support.engines import build_model, one_shot_logits

TINY = {"hidden": 128, "intermediate": 256, "layers": 2, "heads": 4, "kv_heads": 2}
IDS = [1, 400, 2000, 17, 9000, 123, 5, 77, 31000, 42, 8, 1000]


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


def _file(gguf_dir, qtype):
    p = gguf_dir / f"tiny-{qtype}.gguf"
    if not p.exists():
        write_random_gguf(p, TINY, qtype, seed=3, context_length=256, show_progress=False)
    return p


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_quantized_path_equals_the_dense_path(gguf_dir, qtype):
    path = str(_file(gguf_dir, qtype))
    dense = build_model(load_checkpoint(path, show_progress=False, quantize="none"), torch.float32, max_len=256)
    ckpt = load_checkpoint(path, show_progress=False, quantize="auto")
    assert has_quantized(ckpt.weights)
    quant = build_quantized(ckpt.arch, 256, ckpt.weights, load_qkernel())
    assert isinstance(quant.layers[1].qkv_proj, QuantLinear) and isinstance(quant.lm_head, QuantLinear)
    ref = one_shot_logits(dense, IDS)
    got = one_shot_logits(quant, IDS)  # 12 rows: the kernel path
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) <= 1e-4 * max(1.0, scale)
    assert resident_bytes(quant) <= 1.3 * _file(gguf_dir, qtype).stat().st_size + 256 * 64 * 4 * 2


@pytest.mark.parametrize("mode,tol", [("int8", 0.05), ("int4", 0.6)])
def test_fp_file_stays_dense_under_auto_and_quantizes_when_asked(gguf_dir, mode, tol):
    path = str(_file(gguf_dir, "F16"))
    assert not has_quantized(load_checkpoint(path, show_progress=False, quantize="auto").weights)
    dense = build_model(load_checkpoint(path, show_progress=False, quantize="none"), torch.float32, max_len=256)
    ckpt = load_checkpoint(path, show_progress=False, quantize=mode, group=32)
    quant = build_quantized(ckpt.arch, 256, ckpt.weights, load_qkernel())
    assert quant.layers[0].down_proj.parts[0].source == f"{mode}-g32"
    ref, got = one_shot_logits(dense, IDS), one_shot_logits(quant, IDS)
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel <= tol, rel



def test_the_loader_reads_the_header_not_gguf_pys_reader(gguf_dir, monkeypatch):
    """gguf.GGUFReader holds every metadata array element as its own numpy object (SmolLM2's
    vocabulary: +320 MB at the load's peak); the loader reads the header and each tensor by
    offset instead. Oracle: gguf-py's reader and its dequantization of the same file (the
    values end to end: test_logits_oracle, against HF's own GGUF loading)."""
    import gguf
    import numpy as np

    path = str(_file(gguf_dir, "Q4_1"))
    reader = gguf.GGUFReader(path)
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    norm = next(t for t in reader.tensors if t.name == "blk.0.ffn_norm.weight")
    down = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    want_norm = torch.from_numpy(np.array(norm.data, dtype=np.float32))
    want_down = torch.from_numpy(gguf.quants.dequantize(down.data, down.tensor_type).copy())
    del reader

    def refuse(*a, **k):
        raise AssertionError("the loader must not build a gguf.GGUFReader")

    monkeypatch.setattr(gguf, "GGUFReader", refuse)
    dense = load_checkpoint(path, show_progress=False, quantize="none")
    assert dense.arch.vocab_size == vocab
    assert torch.equal(dense.weights["model.layers.0.post_attention_layernorm.weight"], want_norm)
    assert torch.equal(dense.weights["model.layers.1.mlp.down_proj.weight"], want_down.reshape(TINY["hidden"], -1))
    kept = load_checkpoint(path, show_progress=False, quantize="auto").weights["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(kept.dequantize(), want_down.reshape(TINY["hidden"], -1))
