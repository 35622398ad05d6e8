"""Expert offload of a quantized GGUF (issue 22: "quantized experts through the weight path").

Oracle: the same file with every expert resident (loader quantize=auto: each expert a
QuantLinear pair over its own blocks, tests/engine/models/test_moe.py holds that to HF).
Offloaded under half the expert bytes, every policy must give its logits bit for bit, in
prefill and in one-row decodes (the integer-activation kernels), for Q8_0, Q4_0 and Q4_K
experts; and an engine under --moe-memory answers as the resident engine does."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from bastion.engine.models.expert_format import ExpertFormat
from bastion.engine.models.expert_store import ExpertStore
from bastion.engine.models.loader import load_checkpoint
from bastion.engine.models.moe_offload import POLICIES, build_offloaded
from bastion.engine.models.quant_linear import load_qkernel
from bastion.engine.models.quantized_model import build_quantized
from bastion.engine.models.qweights import QuantWeight
from tests.support.engines import decode_one_by_one, one_shot_logits, run_engine
from tests.support.gguf_blocks import gguf_bytes

V, H, INTER, LAYERS, E = 128, 256, 256, 3, 8  # K types need rows of 256


def _write_mixtral_gguf(path, expert_type: str, seed: int = 0) -> None:
    """A tiny Mixtral as llama.cpp stores one (arch llama + expert_count): attention Q8_0,
    stacked experts in `expert_type`, router, norms and embeddings F32."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_context_length, 256), (w.add_embedding_length, H), (w.add_block_count, LAYERS),
                   (w.add_feed_forward_length, INTER), (w.add_head_count, 4), (w.add_head_count_kv, 2),
                   (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_freq_base, 10000.0), (w.add_vocab_size, V),
                   (w.add_expert_count, E), (w.add_expert_used_count, 2)):
        add(v)

    def put(name, shape, qtype=None, scale=0.05):
        if qtype is None:
            w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))
            return
        rows = int(np.prod(shape[:-1]))  # stacked experts: [E, N, K] as E*N rows of K
        raw = gguf_bytes(qtype, rows, shape[-1], rng, scale)
        w.add_tensor(name, raw.reshape(*shape[:-1], -1), raw_dtype=gguf.GGMLQuantizationType[qtype])

    put("token_embd.weight", (V, H), scale=1.0)
    put("output_norm.weight", (H,), scale=0.1)
    put("output.weight", (V, H))
    for i in range(LAYERS):
        for n in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{n}.weight", (1 + 0.1 * rng.standard_normal(H)).astype(np.float32))
        for n, shape in (("attn_q", (H, H)), ("attn_k", (H // 2, H)), ("attn_v", (H // 2, H)), ("attn_output", (H, H))):
            put(f"blk.{i}.{n}.weight", shape, "Q8_0")
        put(f"blk.{i}.ffn_gate_inp.weight", (E, H), scale=0.5)
        for n, shape in (("ffn_gate_exps", (E, INTER, H)), ("ffn_up_exps", (E, INTER, H)),
                         ("ffn_down_exps", (E, H, INTER))):
            put(f"blk.{i}.{n}.weight", shape, expert_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("expert_type", ["Q8_0", "Q4_0", "Q4_K"])
def test_offloaded_quantized_experts_equal_resident_bit_for_bit(tmp_path, expert_type):
    p = tmp_path / f"tiny-mixtral-{expert_type}.gguf"
    _write_mixtral_gguf(p, expert_type)
    kernel = load_qkernel()
    full = load_checkpoint(str(p), show_progress=False, quantize="auto")
    assert isinstance(full.weights["model.layers.0.mlp.experts.3.down_proj.weight"], QuantWeight)
    ref_model = build_quantized(full.arch, 128, full.weights, kernel)
    ids = _ids(24)
    want = torch.cat([one_shot_logits(ref_model, ids), decode_one_by_one(ref_model, ids[:12])])
    store = ExpertStore.open(p)
    first = next(iter(store.spans))
    per_expert = ExpertFormat(torch.float32, kernel).resident_bytes(store, first)
    assert store.spans[first][0].qtype == expert_type
    if expert_type != "Q4_K":  # the blocks' own size; Q4_K's 6-bit sub-block scales widen to fp32
        assert per_expert == store.expert_bytes(first)
    for policy in POLICIES:
        ckpt = load_checkpoint(str(p), show_progress=False, quantize="auto", skip_experts=True)
        assert not any(".experts." in k for k in ckpt.weights)
        model, off = build_offloaded(ckpt, dtype=torch.float32, max_len=128, policy=policy, kernel=kernel,
                                     budget_bytes=int(0.5 * per_expert * len(store.spans)))
        if policy in ("fiddler", "bastion"):
            off.place({k: 1 + (k[1] * 7 + k[0]) % 5 for k in off.store.spans})
        got = torch.cat([one_shot_logits(model, ids), decode_one_by_one(model, ids[:12])])
        s = off.stats.as_dict()
        off.close()
        assert torch.equal(got, want), policy
        assert s["lookups"] > 0
        if policy != "resident":
            assert s["hit_rate"] < 1.0 and s["bytes_read"] > 0 and off.tier.used <= off.budget


def test_engine_serves_a_quantized_moe_gguf_under_moe_memory(tmp_path):
    from bastion.config import CacheConfig, Config, ModelConfig, MoeConfig
    from bastion.engine.builder import build_engine
    from bastion.engine.sampling_params import SamplingParams

    p = tmp_path / "tiny-mixtral-Q4_0.gguf"
    _write_mixtral_gguf(p, "Q4_0", seed=1)
    budget_gb = 0.5 * ExpertStore.open(p).total_bytes / 2**30
    ids = _ids(12, seed=4)
    outs = {}
    for moe in (MoeConfig(), MoeConfig(memory_gb=budget_gb, policy="bastion")):
        engine, _ = build_engine(Config(model=ModelConfig(path=str(p), device="cpu"), cache=CacheConfig(num_blocks=16),
                                        moe=moe), eos_token_id=None, show_progress=False)
        outs[moe.memory_gb] = run_engine(engine, [ids], SamplingParams(max_tokens=6, temperature=0,
                                                                       ignore_eos=True))["r0"]["tokens"]
    s = engine.stats()
    assert 0 < s.moe_expert_hits < s.moe_expert_lookups and s.moe_bytes_read > 0
    assert outs[None] == outs[budget_gb]
    engine.runner.model.moe_offload.close()
