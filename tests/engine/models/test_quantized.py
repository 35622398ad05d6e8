"""Quantized weights: every layout against its oracle.
- repacking: each GGUF type's repacked weight dequantizes to exactly gguf-py's own
  dequantization of the same bytes;
- the native kernel (each instruction-set body this CPU can run: native, AVX2, scalar)
  and the dequantized-tile path equal x @ W^T on the dequantized weight;
- the real model (SmolLM2's Q4_1/Q8_0 file, kept quantized) matches HF transformers' fp32
  logits on the same GGUF, on the kernel path and the tile path, with one copy of the
  tied embedding and resident bytes near the file's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bastion.engine.models.loader import embedded_model_path, load_checkpoint
from bastion.engine.models.quant_linear import (
    INT_MAX_ROWS,
    KERNEL_MAX_ROWS,
    QuantEmbedding,
    QuantLinear,
    load_qkernel,
)
from bastion.engine.models.quantized_model import build_quantized, resident_bytes
from bastion.engine.models.qweights import PackedQ4, QuantWeight, from_gguf, quantize
from tests.support.engines import decode_one_by_one, one_shot_logits
from tests.support.gguf_blocks import gguf_bytes


def _cpu_has(flag: str) -> bool:
    try:
        return f" {flag}" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"])
def test_repacked_gguf_dequantizes_to_ggufs_own_values(type_name):
    import gguf

    rng = np.random.default_rng(0)
    n, k = 8, 512
    raw = gguf_bytes(type_name, n, k, rng)
    ref = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, type_name)).reshape(n, k)
    q = from_gguf(type_name, raw, n, k)
    assert np.array_equal(q.dequantize().numpy(), ref.astype(np.float32))
    rows = torch.tensor([5, 0, 3])
    assert torch.equal(q.take_rows(rows).dequantize(), q.dequantize()[rows])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 128])
def test_groupwise_quantization_error_is_within_half_a_step(bits, group):
    w = torch.randn(16, 256)
    q = quantize(w, bits, group)
    step = q.scale.repeat_interleave(q.group, dim=1)
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    assert q.group == group and q.source == f"int{bits}-g{group}"
    assert quantize(torch.randn(4, 576), bits, 128).group == 32  # 576: 128 does not divide it


def _layouts() -> list[QuantWeight]:
    torch.manual_seed(0)
    w = torch.randn(40, 256)
    sym = quantize(w, 4, 32)
    sym = QuantWeight("q4", sym.codes, sym.scale, None, 32, "Q4_0-like")
    rng = np.random.default_rng(1)
    q6 = from_gguf("Q6_K", gguf_bytes("Q6_K", 40, 256, rng), 40, 256)
    return [quantize(w, 4, 32), quantize(w, 4, 128), sym, quantize(w, 8, 32), quantize(w, 8, 128), q6]


ISAS = ["native", "avx2", "scalar"]


@pytest.mark.parametrize("isa", ISAS)
def test_kernel_matches_the_dequantized_reference(isa):
    if isa == "avx2" and not (_cpu_has("avx2") and _cpu_has("fma")):
        pytest.skip("this CPU has no AVX2/FMA")
    kernel = load_qkernel(isa)
    assert kernel is not None, "the quantized-linear kernel did not build"
    assert kernel.isa() == {"avx2": "avx2", "scalar": "scalar"}.get(isa, kernel.isa())
    for w in _layouts():
        ref_w = w.dequantize().double()
        for m in (1, 3, 4, 9, KERNEL_MAX_ROWS):
            x = torch.randn(m, 256)
            y = QuantLinear([w], kernel=kernel)(x)
            ref = x.double() @ ref_w.T
            bound = 1e-5 * (x.double().abs() @ ref_w.abs().T) + 1e-6  # fp32 summation error
            assert ((y.double() - ref).abs() <= bound).all(), (w.source, m, float((y - ref).abs().max()))
    gu = torch.randn(3, 2 * 100) * 8  # the layer ops built for this ISA too (SwiGLU's exp)
    want = torch.nn.functional.silu(gu[:, :100].double()) * gu[:, 100:].double()
    assert ((kernel.silu_mul(gu).double() - want).abs() <= 1e-6 * want.abs() + 1e-30).all()


def test_native_dequantization_equals_the_reference():
    kernel = load_qkernel()
    for w in _layouts():
        rows = slice(3, 29)
        ref = w.dequantize(rows)
        if w.kind == "q4":
            minv = w.scale.new_empty(0) if w.minv is None else w.minv[rows]
            ours = kernel.q4_dequant(w.codes[rows], w.scale[rows], minv, w.group)
        else:
            ours = kernel.q8_dequant(w.codes[rows], w.scale[rows], w.group)
        assert torch.equal(ours, ref), w.source  # bit for bit: the products are exact in fp32


def test_tile_path_and_fused_parts_match_the_reference(monkeypatch):
    import bastion.engine.models.quant_linear as ql

    monkeypatch.setattr(ql, "TILE_BYTES", 16 * 256 * 4)  # force several tiles
    ws = _layouts()
    mixed = QuantLinear([ws[0], ws[5], ws[2]], bias=torch.arange(120.0), kernel=load_qkernel())
    assert len(mixed.parts) == 2 or len(mixed.parts) == 3  # q4 parts merge only with their like
    ref_w = torch.cat([ws[0].dequantize(), ws[5].dequantize(), ws[2].dequantize()])
    for m in (1, KERNEL_MAX_ROWS + 1, 40):
        x = torch.randn(m, 256, dtype=torch.bfloat16)
        y = mixed(x)
        assert y.dtype == torch.bfloat16 and y.shape == (m, 120)
        ref = x.float() @ ref_w.T + torch.arange(120.0)
        assert torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-1)
        assert torch.allclose(QuantLinear([ws[3]])(x.float()), x.float() @ ws[3].dequantize().T, atol=1e-4)


def test_embedding_rows_follow_the_dtype():
    w = quantize(torch.randn(10, 64), 8, 32)
    emb = QuantEmbedding(w)
    ids = torch.tensor([3, 3, 9])
    assert torch.equal(emb(ids), w.dequantize()[ids])
    assert emb.to(torch.bfloat16)(ids).dtype == torch.bfloat16


# ------------------------------------------------------------------ the real model
@pytest.fixture(scope="module")
def smol_quantized():
    ckpt = load_checkpoint(None, show_progress=False, quantize="auto")
    return build_quantized(ckpt.arch, 2048, ckpt.weights, load_qkernel())


def test_smollm2_kept_quantized_matches_hf_fp32(smol_quantized, gpl_ids, hf_smol_logits):
    m = smol_quantized
    assert isinstance(m.layers[0].qkv_proj, QuantLinear) and isinstance(m.embed_tokens, QuantEmbedding)
    assert m.lm_head.parts[0] is m.embed_tokens.weight_q  # tied: one copy of the codes
    # NOTE: packed q4 projections (VNNI) take int16 activations at every batch size, prefill
    # included (measured 0.01 on these logits); the fp32 kernels and tiles are exact to 1e-3
    packed = any(isinstance(w, PackedQ4) for mod in m.modules() if isinstance(mod, QuantLinear) for w in mod.parts)
    ours = one_shot_logits(m, gpl_ids)  # 64 rows: prefill (packed kernel, or the tile path)
    short = one_shot_logits(m, gpl_ids[:KERNEL_MAX_ROWS])  # the decode-batch kernel path
    for got, want in ((ours, hf_smol_logits), (short, hf_smol_logits[:KERNEL_MAX_ROWS])):
        diff = float((got - want).abs().max())
        assert diff <= (0.05 if packed else 1e-3), diff
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    file_bytes = embedded_model_path().stat().st_size
    assert resident_bytes(m) <= 1.25 * file_bytes


def _int_rows(x: torch.Tensor, levels: float) -> torch.Tensor:
    """x as an integer path sees it: per 32-block, absmax/levels scale, round to nearest
    (int8: 127 levels; int16: 127 * 256, the two-byte code)."""
    b = x.double().view(x.shape[0], -1, 32)
    d = b.abs().amax(-1, keepdim=True) / levels
    return (torch.round(b / torch.where(d > 0, d, 1.0)).clamp(-levels, levels) * d).view_as(x)


@pytest.mark.parametrize("activations,levels", [("int8", 127.0), ("int16", 127.0 * 256)])
def test_integer_activation_kernels_match_their_oracle(activations, levels):
    kernel = load_qkernel()
    if not kernel.q4_linear_i8_supported():
        pytest.skip("this CPU has no AVX512-VNNI: the integer paths are not built (fp32 serves)")
    torch.manual_seed(0)
    w = torch.randn(48, 512)
    q = quantize(w, 4, 32)
    rng = np.random.default_rng(2)
    for qq in (q, QuantWeight("q4", q.codes, q.scale, None, 32, "sym"),
               from_gguf("Q4_K", gguf_bytes("Q4_K", 48, 512, rng), 48, 512),
               from_gguf("Q8_0", gguf_bytes("Q8_0", 48, 512, rng), 48, 512), quantize(w, 8, 32)):
        lin = QuantLinear([qq], kernel=kernel, activations=activations)
        assert lin.activations == [activations] and lin.int8 == (activations == "int8")
        x = torch.randn(INT_MAX_ROWS, 512) * torch.linspace(0.01, 30, 512)  # blocks of very different scales
        ref = _int_rows(x, levels) @ qq.dequantize().double().T
        bound = 1e-5 * (x.double().abs() @ qq.dequantize().double().abs().T) + 1e-5
        assert ((lin(x).double() - ref).abs() <= bound).all(), qq.source
        # more rows than INT_MAX_ROWS: the fp32 kernel, exact to the dequantized weights
        x = torch.randn(INT_MAX_ROWS + 3, 512)
        exact = x.double() @ qq.dequantize().double().T
        assert ((lin(x).double() - exact).abs() <= 1e-5 * (x.double().abs() @ qq.dequantize().double().abs().T) + 1e-6).all()


def _q4_layouts() -> list[QuantWeight]:
    torch.manual_seed(1)
    q = quantize(torch.randn(48, 512), 4, 32)
    return [q, QuantWeight("q4", q.codes, q.scale, None, 32, "Q4_0-like"),
            from_gguf("Q4_K", gguf_bytes("Q4_K", 48, 512, np.random.default_rng(3)), 48, 512)]


def test_packed_q4_holds_the_same_weight():
    kernel = load_qkernel()
    for w in _q4_layouts():
        p = PackedQ4.pack(w, kernel)
        u = p.unpack()
        assert p.nbytes == w.nbytes and p.shape == w.shape
        assert torch.equal(u.codes, w.codes) and torch.equal(u.scale, w.scale), w.source
        assert (u.minv is None) == (w.minv is None) and (u.minv is None or torch.equal(u.minv, w.minv))
        assert torch.equal(kernel.q4p_dequant(p.packed, 1, 3, p.has_min, p.f32), w.dequantize(slice(16, 48)))


@pytest.mark.parametrize("activations,levels", [("int8", 127.0), ("int16", 127.0 * 256), ("auto", 127.0 * 256)])
def test_packed_kernel_matches_its_oracle_at_every_batch_size(activations, levels, monkeypatch):
    import bastion.engine.models.quant_linear as ql

    kernel = load_qkernel()
    if not kernel.q4_linear_i8_supported():
        pytest.skip("this CPU has no AVX512-VNNI: nothing is packed (the per-row kernels serve)")
    monkeypatch.setattr(ql, "TILE_BYTES", 16 * 512 * 4)  # prefill: several packed tiles
    for w in _q4_layouts():
        lin = QuantLinear([w], kernel=kernel, activations=activations, pack=True)
        assert isinstance(lin.parts[0], PackedQ4) and lin.activations == [activations.replace("auto", "int16")]
        ref_w = w.dequantize().double()
        for m in (1, 2, 3, 4, 7, KERNEL_MAX_ROWS):
            x = torch.randn(m, 512) * torch.linspace(0.01, 30, 512)
            ref = _int_rows(x, levels) @ ref_w.T
            bound = 1e-5 * (x.double().abs() @ ref_w.abs().T) + 1e-5
            assert ((lin(x).double() - ref).abs() <= bound).all(), (w.source, m)
        # prefill rows: the kernel in int16 whatever decode takes (int8's prompt rounding costs answers)
        x = torch.randn(KERNEL_MAX_ROWS + 5, 512) * torch.linspace(0.01, 30, 512)
        ref = _int_rows(x, 127.0 * 256) @ ref_w.T
        assert ((lin(x).double() - ref).abs() <= 1e-5 * (x.double().abs() @ ref_w.abs().T) + 1e-5).all()
    fp = QuantLinear([_q4_layouts()[0]], kernel=kernel, activations="fp32", pack=True)
    assert isinstance(fp.parts[0], QuantWeight)  # fp32 activations: nothing packed


def test_fp32_activations_never_take_the_integer_kernel():
    kernel = load_qkernel()
    lin = QuantLinear([quantize(torch.randn(8, 128), 4, 32)], kernel=kernel, activations="fp32")
    assert lin.activations == ["fp32"] and lin._calls[0][1] is None
    g128 = QuantLinear([quantize(torch.randn(8, 256), 8, 128)], kernel=kernel, activations="auto")
    assert g128.activations == ["fp32"]  # only group-32 layouts have integer kernels
    with pytest.raises(ValueError, match="activations"):
        QuantLinear([quantize(torch.randn(8, 128), 4, 32)], kernel=kernel, activations="int4")


def test_smollm2_int16_batch1_decode_tracks_hf_fp32(smol_quantized, gpl_ids, hf_smol_logits):
    """The default batch-1 path (int16 activations where VNNI is): one row at a time
    through a paged cache, against HF fp32 on the same file."""
    m = smol_quantized
    if not any("int16" in mod.activations for mod in m.modules() if isinstance(mod, QuantLinear)):
        pytest.skip("no int16 path on this CPU (no AVX512-VNNI): batch-1 decode is the fp32 kernel")
    rows = decode_one_by_one(m, gpl_ids[:24])
    diff = float((rows - hf_smol_logits[:24]).abs().max())
    # NOTE: measured 0.01 (int8 activations: ~2.9); fp32 activations <= 1e-3
    print(f"int16 batch-1 max |logit - HF fp32|: {diff:.4f}")
    assert diff <= 0.05, diff
    assert torch.equal(rows.argmax(-1), hf_smol_logits[:24].argmax(-1))


def test_quantized_projection_keeps_its_bias(tmp_path):
    """Qwen2's q/k/v biases ride on the swapped QuantLinear: building on the meta device and
    materialising (to_empty) must not leave them as uninitialised memory (it did: garbage
    biases, NaN logits, for every quantized Qwen2)."""
    import types

    from transformers import AutoModelForCausalLM, Qwen2Config

    from tests.support.engines import build_model

    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    hf.save_pretrained(str(tmp_path))
    ckpt = load_checkpoint(str(tmp_path), show_progress=False, quantize="int8")
    want = torch.cat([ckpt.weights[f"model.layers.0.self_attn.{n}_proj.bias"] for n in "qkv"])
    deq = {k: (w.dequantize() if isinstance(w, QuantWeight) else w) for k, w in ckpt.weights.items()}
    dense = build_model(types.SimpleNamespace(arch=ckpt.arch, weights=deq), torch.float32, max_len=64)
    m = build_quantized(ckpt.arch, 64, dict(ckpt.weights), load_qkernel(), activations="fp32")
    assert isinstance(m.layers[0].qkv_proj, QuantLinear)
    assert torch.equal(m.layers[0].qkv_proj.bias, want)
    ids = list(range(1, 30))
    assert float((one_shot_logits(m, ids) - one_shot_logits(dense, ids)).abs().max()) <= 1e-4


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_native_block_split_equals_from_gguf_on_the_concatenation(type_name):
    """The kernel's gguf_split_blocks (what offloaded experts repack with on every read)
    gives from_gguf's codes, scales and mins on the parts' concatenated rows, exactly."""
    from bastion.engine.models.qweights import from_gguf_native

    kernel = load_qkernel()
    if kernel is None or not hasattr(kernel, "gguf_split_blocks"):
        pytest.skip("native kernel not built here")
    rng = np.random.default_rng(7)
    a, b = gguf_bytes(type_name, 24, 256, rng), gguf_bytes(type_name, 40, 256, rng)
    got = from_gguf_native(type_name, [torch.from_numpy(a.reshape(-1)), torch.from_numpy(b.reshape(-1))], 256,
                           kernel.gguf_split_blocks)
    want = from_gguf(type_name, np.concatenate([a, b]), 64, 256)
    for field in ("codes", "scale", "minv"):
        x, y = getattr(got, field), getattr(want, field)
        assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y)), field
    assert (got.kind, got.group, got.source) == (want.kind, want.group, want.source)
    assert from_gguf_native("Q4_K", [torch.zeros(144, dtype=torch.uint8)], 256, kernel.gguf_split_blocks) is None
    with pytest.raises(RuntimeError, match="whole"):
        kernel.gguf_split_blocks([torch.zeros(17, dtype=torch.uint8)], 18, 2)
