"""`bastion bench kv-quality`: metrics on hand-made logits, bytes accounting by hand, the
passkey prompt builder, and the benchmark end to end on the real model at tiny contexts
(plus the HF peer worker on a tiny random HF model)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from bastion.bench import kv_quality as kq
from bastion.bench import kv_quality_hf as khf
from bastion.bench import quality_metrics as qm
from bastion.bench.plots import kv_quality_table, plot_kv_quality

L, H, D = 30, 3, 64  # SmolLM2-135M
FP16_TOKEN = 2 * L * H * D * 2  # 23040


# ---------------------------------------------------------------- metrics

def test_perplexity_on_hand_made_logits():
    # uniform over 4 -> PPL 4 whatever the targets
    assert qm.perplexity(torch.zeros(3, 4), torch.tensor([0, 1, 3])) == pytest.approx(4.0)
    # p(target) = e^2 / (e^2 + 3) in every row -> PPL = 1 / p
    logits = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0]])
    p = math.exp(2) / (math.exp(2) + 3)
    assert qm.perplexity(logits, torch.tensor([0, 1])) == pytest.approx(1 / p)
    # mixed rows: geometric mean of 1/p
    p_other = 1 / (math.exp(2) + 3)
    assert qm.perplexity(logits, torch.tensor([0, 0])) == pytest.approx(math.sqrt(1 / p / p_other))


def test_top1_agreement_and_kl():
    ref = torch.tensor([[3.0, 1, 0], [0, 3.0, 1], [1, 0, 3.0], [0, 0, 1.0]])
    other = torch.tensor([[2.0, 1, 0], [3.0, 0, 1], [1, 0, 3.0], [5, 0, 1.0]])
    assert qm.top1_agreement(other, ref) == pytest.approx(0.5)
    assert qm.top1_agreement(ref, ref) == 1.0
    assert qm.mean_kl(ref, ref) == pytest.approx(0.0, abs=1e-12)
    pr, po = torch.softmax(ref.double(), -1), torch.softmax(other.double(), -1)
    want = (pr * (pr.log() - po.log())).sum(-1).mean().item()
    assert qm.mean_kl(other, ref) == pytest.approx(want)
    m = qm.quality_metrics(other, ref, torch.tensor([0, 1, 2, 2]))
    assert m["delta_ppl_pct"] == pytest.approx(100 * (m["ppl"] - m["ref_ppl"]) / m["ref_ppl"])
    assert set(m) == {"ppl", "ref_ppl", "delta_ppl_pct", "top1_agreement", "kl"}


# ---------------------------------------------------------------- bytes

def test_bytes_per_token_by_hand():
    v = kq.KVVariant("x", "k4v2", group_size=32, residual=128, sink=32)
    # ctx 2048: 1920 quantized tokens, 128 in the fp16 window, + fp16 copy of 32 sink tokens.
    # quantized token, per layer and kv head: K 64*4/8 + 2*2*64/32 = 40 B, V 64*2/8 + 8 = 24 B
    per_q = L * H * (40 + 24)
    want = (1920 * per_q + 128 * FP16_TOKEN + 32 * FP16_TOKEN) / 2048
    assert kq.kv_bytes_per_token(v, L, H, D, 2048) == pytest.approx(want) == pytest.approx(7200.0)
    # G64 R64: window 64..127; at 2048 -> 1984 quantized (K 32+4, V 16+4 = 56 B per layer/head)
    v64 = kq.KVVariant("y", "k4v2", group_size=64, residual=64)
    assert kq.kv_bytes_per_token(v64, L, H, D, 2048) == pytest.approx((1984 * L * H * 56 + 64 * FP16_TOKEN) / 2048)
    # nothing quantized yet: all window, and the sink copy is not counted twice
    assert kq.kv_bytes_per_token(v, L, H, D, 100) == pytest.approx(FP16_TOKEN)
    assert kq.kv_bytes_per_token(kq.KVVariant("f", "fp16"), L, H, D, 2048) == FP16_TOKEN
    assert kq.kv_bytes_per_token(kq.KVVariant("f", "fp32"), L, H, D, 2048) == 2 * FP16_TOKEN
    # HF peer (nominal): int4 codes + fp16 scale/shift per 64 elements + R/2 fp16 residual
    hf = khf.hf_bytes_per_token(4, L, H, D, 2048)
    assert hf == pytest.approx(L * H * 2 * (32 + 4) + 64 * FP16_TOKEN / 2048)


def test_parse_variant():
    v = kq.parse_variant("x=k4v2:g64:r32:s64:had:clip")
    assert (v.name, v.kind, v.group_size, v.residual, v.sink, v.hadamard, v.clip) == ("x", "k4v2", 64, 32, 64, True, True)
    assert kq.parse_variant("kivi2") == kq.KVVariant("kivi2", "kivi2")
    vg = kq.parse_variant("e=kivi:vg64")
    assert vg.value_group == 64 and vg.quant_options()["value_group"] == 64
    assert kq.kv_bytes_per_token(vg, L, H, D, 8192) < kq.kv_bytes_per_token(kq.KVVariant("k", "kivi"), L, H, D, 8192)
    opts = v.quant_options()
    assert {k: opts[k] for k in ("group_size", "residual", "sink", "hadamard", "clip")} == {
        "group_size": 64, "residual": 32, "sink": 64, "hadamard": True, "clip": True}
    assert kq.KVVariant("f", "fp16").quant_options() is None
    for bad in ("k3v2", "x=k4v2:q9", "x=k4v2:g32:s16", "x=k4v2:vg6"):
        with pytest.raises(ValueError):
            kq.parse_variant(bad)


# ---------------------------------------------------------------- text and passkey

class ByteTok:
    def encode(self, text, add_special_tokens=False):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")


def test_passkey_prompts_place_the_needle():
    tok = ByteTok()
    filler = tok.encode("abcdefghij" * 100)
    prompts = kq.passkey_prompts(tok, filler, 600, (0.0, 0.5, 1.0), seed=1)
    keys = [k for _, k, _ in prompts]
    assert len(set(keys)) == 3 and all(len(k) == 5 and k.isdigit() for k in keys)
    for ids, key, depth in prompts:
        assert len(ids) == 600
        text = tok.decode(ids)
        assert text.startswith(kq.PASSKEY_INTRO) and text.endswith(kq.PASSKEY_QUESTION)
        body = text[len(kq.PASSKEY_INTRO):-len(kq.PASSKEY_QUESTION)]
        at = body.index(kq.PASSKEY_NEEDLE.format(key=key))
        assert at == round(depth * (len(body) - len(kq.PASSKEY_NEEDLE.format(key=key))))
    assert kq.passkey_prompts(tok, filler, 600, (0.5,), seed=1)[0][1] == keys[0]  # deterministic
    with pytest.raises(ValueError):
        kq.passkey_prompts(tok, filler[:10], 600, (0.5,))
    assert qm.passkey_found(" 12345. Remember", "12345")
    assert not qm.passkey_found(" 1234", "12345") and not qm.passkey_found(" 99 12345", "12345")


def test_corpus_text_is_deterministic_and_starts_with_gpl3():
    a, b = kq.corpus_text(), kq.corpus_text()
    assert a == b and len(a) > 200_000
    assert a.startswith(open("/usr/share/common-licenses/GPL-3", encoding="utf-8").read()[:200])


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def maker():
    torch.set_num_threads(1)  # shared 2-core machine: one thread is much faster under load
    return kq.EngineMaker(None, "float32", 256, 1)


def test_run_kv_quality_end_to_end(maker, tmp_path):
    cfg = kq.KVQualityConfig(contexts=(64,), steps=4, chunk=32, passkey_contexts=(120,), passkey_depths=(0.5,),
                             passkey_new_tokens=3, max_model_len=256, threads=1,
                             variants=(kq.KVVariant("fp16", "fp16"), kq.parse_variant("q=k2v2:g32:r16:s32:had")))
    result = kq.run_kv_quality(cfg, maker, log=lambda s: None)
    result = json.loads(json.dumps(result))  # well-formed JSON
    tf = [r for r in result["rows"] if "ppl" in r]
    assert [(r["config"], r["ctx"]) for r in tf] == [("fp32", 64), ("fp16", 64), ("q", 64)]
    ref, fp16, q = tf
    assert ref["delta_ppl_pct"] == 0 and ref["top1_agreement"] == 1 and ref["kl"] == 0
    assert abs(fp16["delta_ppl_pct"]) < 1 and fp16["ratio_vs_fp16"] == 1
    # ctx 64, G32 R16: 32 tokens quantized (all sink), window 32 -> 1 + 32/64 fp16 copies
    assert q["bytes_per_token"] == pytest.approx((32 * L * H * (24 + 24) + 32 * FP16_TOKEN + 32 * FP16_TOKEN) / 64)
    assert all(r["ppl"] > 1 and 0 <= r["top1_agreement"] <= 1 for r in tf)
    pk = [r for r in result["rows"] if "passkey" in r]
    assert [(r["config"], r["ctx"]) for r in pk] == [("fp32", 120), ("fp16", 120), ("q", 120)]
    assert all(len(r["passkey"]) == 1 and 0 <= r["passkey_success"] <= 1 for r in pk)
    table = kv_quality_table(result)
    assert "| q | G32 R16 S32 had | 64 |" in table and "Passkey" in table
    plot_kv_quality(result, tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 1000


def test_hf_peer_worker_on_a_tiny_model(tmp_path, monkeypatch):
    """The peer path (subprocess, JSON spec, saved logits, metrics here) with this venv's
    python on a tiny random HF Llama: the fp32 run is its own reference."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg_hf = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg_hf).save_pretrained(tmp_path / "hf")
    monkeypatch.setattr(khf, "HF_CACHES", ())  # quantized peers need optimum-quanto/hqq, not in this venv

    class Arch:
        num_layers, num_kv_heads, head_dim = 2, 2, 16

    corpus = [(i * 7) % 256 for i in range(200)]
    cfg = kq.KVQualityConfig(contexts=(40,), steps=3, passkey_contexts=(50,), passkey_depths=(0.5,),
                             passkey_new_tokens=2, threads=1)
    tok = ByteTok()
    pk = {50: [(tok.encode("The pass key is 12345. " * 2), "12345", 0.5)]}
    rows = khf.run_hf_peers(sys.executable, str(tmp_path / "hf"), corpus, [40], pk, cfg, tok, Arch(), log=lambda s: None)
    assert [r["config"] for r in rows] == ["hf-fp32", "hf-fp32"]
    assert rows[0]["delta_ppl_pct"] == 0 and rows[0]["top1_agreement"] == 1
    assert len(rows[1]["passkey"]) == 1
