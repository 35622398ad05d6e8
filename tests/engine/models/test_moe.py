"""Mixture-of-experts models (issue 22, deliverable 1) against their oracles, fp32, max |Δlogit| <= 1e-4:
- HF transformers 5.x on a tiny random config of each family (Mixtral; Qwen2-MoE with its
  sigmoid-gated shared expert and a dense mlp_only layer; Qwen3-MoE with per-head q/k norms
  and norm_topk_prob; OLMoE with whole-projection q/k norms and clip_qkv), saved with
  save_pretrained and served by the real engine: several sequences of different lengths,
  chunked prefill mixed with decodes, every computed row compared;
- the same from GGUF files written as llama.cpp writes them (stacked *_exps experts, Q8_0),
  dense and with the experts kept quantized;
- sparse upcycling: E copies of a dense MLP under any router give the dense model's logits
  (a tiny Llama through save/load and HF, and the real embedded SmolLM2)."""

from __future__ import annotations

import dataclasses
import time
import types

import numpy as np
import pytest
import torch

from bastion.engine.models.arch import ModelArch
from bastion.engine.models.loader import load_checkpoint
from bastion.engine.models.moe import ModuleExperts, MoEMLP, StackedExperts
from bastion.engine.sampling_params import SamplingParams
from tests.support.engines import build_model, decode_one_by_one, make_engine, one_shot_logits, randomize

TOL = 1e-4
V = 512
_COMMON = dict(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def _configs(gguf: bool = False):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    return {
        "mixtral": MixtralConfig(**_COMMON, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
        "qwen2_moe": Qwen2MoeConfig(**_COMMON, intermediate_size=96, moe_intermediate_size=64,
                                    shared_expert_intermediate_size=96, num_experts=8, num_experts_per_tok=2,
                                    norm_topk_prob=False, mlp_only_layers=[] if gguf else [1]),
        "qwen3_moe": Qwen3MoeConfig(**{**_COMMON, "tie_word_embeddings": True}, intermediate_size=96,
                                    moe_intermediate_size=64, num_experts=6, num_experts_per_tok=2,
                                    norm_topk_prob=True, head_dim=32),
        "olmoe": OlmoeConfig(**_COMMON, intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                             norm_topk_prob=False, clip_qkv=None if gguf else 2.0),
    }


def _hf_model(cfg, seed: int = 0):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    randomize(hf, seed)
    return hf


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def _texts(n_prompt: list[int], new: int, seed: int = 0) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(seed)
    return {f"s{i}": torch.randint(0, V, (p + new,), generator=g).tolist() for i, p in enumerate(n_prompt)}


def _teacher_force(engine, texts: dict[str, list[int]], new: int):
    """Serve every text's prompt (all but its last `new` tokens, prompt logits asked for)
    and feed its true continuation instead of sampling. -> ({rid: {position: logits row}},
    [[(rid, tokens) per item] per step])."""
    for rid, ids in texts.items():
        engine.add_request(rid, ids[:-new], SamplingParams(max_tokens=new + 1, temperature=0, prompt_logprobs=0))
    rows: dict[str, dict[int, torch.Tensor]] = {rid: {} for rid in texts}
    steps = []
    while engine.has_unfinished():
        batch = engine.scheduler.schedule()
        steps.append([(r.request_id, n) for r, n in batch.items])
        out = engine.runner.execute(batch)
        for rid, (first, lg) in out.prompt_logits.items():
            rows[rid].update({first - 1 + j: lg[j] for j in range(lg.shape[0])})
        for req, n in batch.items:
            req.num_computed_tokens += n
            engine.block_manager.cache_full_blocks(req)
        for req, row in zip(out.sample_reqs, out.sample_logits if out.sample_reqs else []):
            text = texts[req.request_id]
            assert req.token_ids == text[: req.num_tokens]
            rows[req.request_id][req.num_tokens - 1] = row
            if req.num_tokens >= len(text):
                engine.scheduler.finish(req, "length")
                engine.requests.pop(req.request_id, None)
            else:
                req.token_ids.append(text[req.num_tokens])
    return rows, steps


def _engine_vs_hf(engine, hf, texts: dict[str, list[int]], new: int) -> float:
    rows, steps = _teacher_force(engine, texts, new)
    worst = 0.0
    for rid, ids in texts.items():
        ref = _hf_logits(hf, ids)
        assert sorted(rows[rid]) == list(range(len(ids))), rid  # every position, once
        for pos, row in rows[rid].items():
            worst = max(worst, float((row - ref[pos]).abs().max()))
    assert any(len(s) >= 3 and all(n == 1 for _, n in s) for s in steps), "no batched decode step"
    assert any(any(n == 1 for _, n in s) and any(n > 1 for _, n in s) for s in steps), "no mixed step"
    return worst


# ------------------------------------------------------------------ HF directories through the engine
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_tiny_moe_matches_hf_through_the_engine(name, tmp_path):
    cfg = _configs()[name]
    hf = _hf_model(cfg, seed=len(name))
    hf.save_pretrained(str(tmp_path))
    ckpt = load_checkpoint(str(tmp_path), show_progress=False)
    a = ckpt.arch
    assert (a.model_type, a.num_experts, a.num_experts_per_tok) == (name, cfg.num_experts, 2)
    model = build_model(ckpt, torch.float32, max_len=256)
    # HF's in-memory names (experts fused: gate_up_proj [E, 2I, H]) load to the same model
    fused = build_model(types.SimpleNamespace(arch=a, weights=hf.state_dict()), torch.float32, max_len=256)
    probe = _texts([24], 0, seed=9)["s0"]
    assert torch.equal(one_shot_logits(fused, probe), one_shot_logits(model, probe))
    moe = [i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoEMLP)]
    assert moe == ([0, 2] if name == "qwen2_moe" else [0, 1, 2])  # Qwen2-MoE's mlp_only layer 1 is dense
    if name == "olmoe":  # negative control: clip_qkv really clips here
        plain = _hf_model(type(cfg)(**{**cfg.to_dict(), "clip_qkv": None}), seed=len(name))
        ids = _texts([40], 0)["s0"]
        assert float((_hf_logits(plain, ids) - _hf_logits(hf, ids)).abs().max()) > 100 * TOL
    # four sequences of different lengths; a 32-token budget chunks the long prompts into
    # steps that also carry the short ones' decodes
    texts = _texts([5, 17, 45, 26], new=6, seed=len(name))
    eng = make_engine(model, num_blocks=32, max_num_batched_tokens=32, prefix_caching=False)
    worst = _engine_vs_hf(eng, hf, texts, new=6)
    print(f"{name}: max |logit - HF| over {sum(map(len, texts.values()))} rows: {worst:.2e}")
    assert worst <= TOL


@pytest.mark.parametrize("name,quantize", [("qwen2_moe", "int8"), ("qwen3_moe", "none"), ("olmoe", "int8")])
def test_moe_built_by_the_engine_builder(name, quantize, tmp_path):
    """build_engine on the HF dir: native layer ops (q/k norms through them), the whole-step
    native decode declined for MoE layers; under int8 the experts become one QuantLinear
    pair each and equal a dense model on the same (dequantized) weights."""
    from bastion.config import CacheConfig, Config, ModelConfig, SchedulerConfig
    from bastion.engine.builder import build_engine

    cfg = _configs()[name]
    hf = _hf_model(cfg, seed=7)
    hf.save_pretrained(str(tmp_path))
    config = Config(model=ModelConfig(path=str(tmp_path), dtype="float32", quantize=quantize, activations="fp32",
                                      max_model_len=256), cache=CacheConfig(num_blocks=32, prefix_caching=False),
                    scheduler=SchedulerConfig(max_num_batched_tokens=24))
    engine, _ = build_engine(config, eos_token_id=None, show_progress=False)
    model = engine.runner.model
    assert model.fused_decode is None
    experts = {type(layer.mlp.experts) for layer in model.layers if layer.mlp is not None}
    assert experts == {ModuleExperts if quantize == "int8" else StackedExperts}
    if quantize == "int8":
        from bastion.engine.models.fused_decode import FusedDecode
        from bastion.engine.models.quant_linear import load_qkernel

        assert FusedDecode.build(model, load_qkernel()) is None
        ckpt = load_checkpoint(str(tmp_path), show_progress=False, quantize="int8")
        deq = {k: (w.dequantize() if hasattr(w, "dequantize") else w) for k, w in ckpt.weights.items()}
        assert isinstance(ckpt.weights["model.layers.0.mlp.gate.weight"], torch.Tensor)  # routers stay fp
        assert not isinstance(ckpt.weights["model.layers.0.mlp.experts.0.gate_proj.weight"], torch.Tensor)
        hf.load_state_dict(_hf_state_from(build_model(types.SimpleNamespace(arch=ckpt.arch, weights=deq)), hf))
    worst = _engine_vs_hf(engine, hf, _texts([9, 30, 21], new=5, seed=3), new=5)
    print(f"{name} ({quantize}) via build_engine: max |logit - HF| {worst:.2e}")
    assert worst <= TOL


def _hf_state_from(ours, hf) -> dict:
    """HF's state dict with our (dequantized) weights put in: the oracle of a quantized model."""
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    for i, layer in enumerate(ours.layers):
        p = f"model.layers.{i}."
        q, k = layer.q_size, layer.kv_size
        w = layer.qkv_proj.weight.detach()
        sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"] = w[:q], w[q:q + k]
        sd[p + "self_attn.v_proj.weight"] = w[q + k:]
        sd[p + "self_attn.o_proj.weight"] = layer.o_proj.weight.detach()
        if layer.mlp is None:
            gu = layer.gate_up_proj.weight.detach()
            sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = gu.chunk(2)
            sd[p + "mlp.down_proj.weight"] = layer.down_proj.weight.detach()
            continue
        sd[p + "mlp.experts.gate_up_proj"] = layer.mlp.experts.gate_up.detach()
        sd[p + "mlp.experts.down_proj"] = layer.mlp.experts.down.detach()
        if layer.mlp.shared_gate_up is not None:
            gu = layer.mlp.shared_gate_up.weight.detach()
            sd[p + "mlp.shared_expert.gate_proj.weight"], sd[p + "mlp.shared_expert.up_proj.weight"] = gu.chunk(2)
            sd[p + "mlp.shared_expert.down_proj.weight"] = layer.mlp.shared_down.weight.detach()
    if "lm_head.weight" in sd:
        sd["lm_head.weight"] = ours.lm_head.weight.detach()
    sd["model.embed_tokens.weight"] = ours.embed_tokens.weight.detach()
    return sd


# ------------------------------------------------------------------ GGUF (llama.cpp's layout)
_GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}
_GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "mlp.gate": "ffn_gate_inp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
               "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
               "mlp.shared_expert.down_proj": "ffn_down_shexp"}


def _permute_like_llama_cpp(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(hf, cfg, name: str, path) -> None:
    """As convert_hf_to_gguf.py + llama-quantize would: Q8_0 projections and stacked
    experts (routers, norms, embeddings F32); Mixtral as arch llama with q/k permuted.
    HF's weights are replaced by the dequantized values, so HF stays the oracle."""
    import gguf

    q8 = gguf.GGMLQuantizationType.Q8_0
    arch = _GGUF_ARCH[name]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(512)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(V)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if name in ("qwen2_moe", "qwen3_moe"):
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if name == "qwen2_moe":
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)

    def put(gname: str, t: torch.Tensor, heads: int | None = None) -> torch.Tensor:
        arr = _permute_like_llama_cpp(t, heads) if heads else t
        if arr.ndim == 1 or gname.startswith(("token_embd", "output_norm")) or "gate_inp" in gname:
            w.add_tensor(gname, arr.contiguous().numpy())
            return t
        q = gguf.quants.quantize(arr.contiguous().numpy(), q8)
        w.add_tensor(gname, q, raw_dtype=q8)
        deq = torch.from_numpy(np.array(gguf.quants.dequantize(q, q8), dtype=np.float32)).reshape(arr.shape)
        if heads:  # back to HF's row order
            deq = deq.reshape(heads, deq.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(deq.shape)
        return deq

    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads} if arch == "llama" else {}
    with torch.no_grad():
        for key, t in hf.state_dict().items():
            if key == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            if key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
                t.copy_(put({"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                             "lm_head.weight": "output.weight"}[key], t.float()))
                continue
            _, _, i, rest = key.split(".", 3)
            if rest == "mlp.experts.gate_up_proj":
                inter = t.shape[1] // 2
                t.copy_(torch.cat([put(f"blk.{i}.ffn_gate_exps.weight", t[:, :inter].float()),
                                   put(f"blk.{i}.ffn_up_exps.weight", t[:, inter:].float())], 1))
            elif rest == "mlp.experts.down_proj":
                t.copy_(put(f"blk.{i}.ffn_down_exps.weight", t.float()))
            else:
                base, kind = rest.rsplit(".", 1)
                g = _GGUF_NAMES[base]
                src = t.float().reshape(-1) if g == "ffn_gate_inp_shexp" else t.float()  # llama.cpp: [H]
                t.copy_(put(f"blk.{i}.{g}.{kind}", src, heads.get(g)).reshape(t.shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_tiny_moe_gguf_matches_hf(name, tmp_path):
    """Our GGUF reader on llama.cpp's MoE layout: dense (--quantize none) and with the Q8_0
    experts kept quantized (auto: one QuantLinear pair per expert), both HF's logits on
    the same dequantized weights; prefill (tiles) and one-row decodes (the kernel)."""
    from bastion.engine.models.quant_linear import load_qkernel
    from bastion.engine.models.quantized_model import build_quantized

    cfg = _configs(gguf=True)[name]
    hf = _hf_model(cfg, seed=11)
    p = tmp_path / f"tiny-{name}.gguf"
    _write_gguf(hf, cfg, name, p)
    ids = _texts([40], 0, seed=5)["s0"]
    ref = _hf_logits(hf, ids)
    dense = load_checkpoint(str(p), show_progress=False, quantize="none")
    a = dense.arch
    assert (a.model_type, a.num_experts, a.norm_topk_prob) == (name, cfg.num_experts, name in ("mixtral", "qwen3_moe"))
    assert dataclasses.replace(a, hf_config=None) == \
        dataclasses.replace(ModelArch.from_hf_config(a.hf_config.to_transformers()), hf_config=None)
    got = one_shot_logits(build_model(dense, torch.float32, max_len=128), ids)
    worst = float((got - ref).abs().max())
    kept = load_checkpoint(str(p), show_progress=False, quantize="auto")
    assert type(kept.weights["model.layers.0.mlp.experts.0.gate_proj.weight"]).__name__ == "QuantWeight"
    q = build_quantized(kept.arch, 128, kept.weights, load_qkernel(), activations="fp32")
    assert all(isinstance(layer.mlp.experts, ModuleExperts) for layer in q.layers)
    worst_q = max(float((one_shot_logits(q, ids) - ref).abs().max()),
                  float((decode_one_by_one(q, ids[:12]) - ref[:12]).abs().max()))
    print(f"{name} GGUF: max |logit - HF| dense {worst:.2e}, experts kept Q8_0 {worst_q:.2e}")
    assert worst <= TOL and worst_q <= TOL


# ------------------------------------------------------------------ sparse upcycling: the exactness oracle
def test_upcycled_tiny_llama_equals_dense_here_and_in_hf(tmp_path):
    """E=4 copies of each MLP, top-2 under a random router: the same logits as the dense
    Llama, through save_hf_dir -> our loader -> the engine, and through transformers."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from bastion.engine.models.upcycle import save_hf_dir, upcycle

    cfg = LlamaConfig(**{**_COMMON, "tie_word_embeddings": True}, intermediate_size=96)
    hf = _hf_model(cfg, seed=3)
    hf.save_pretrained(str(tmp_path / "dense"))
    dense = load_checkpoint(str(tmp_path / "dense"), show_progress=False)
    mcfg, w = upcycle(dense.arch, dense.weights, num_experts=4, top_k=2, seed=1, router_std=3.0)
    save_hf_dir(tmp_path / "moe", mcfg, w)
    moe = load_checkpoint(str(tmp_path / "moe"), show_progress=False)
    assert (moe.arch.model_type, moe.arch.num_experts) == ("mixtral", 4)
    texts = _texts([7, 33, 20], new=4, seed=2)
    eng = make_engine(build_model(moe, torch.float32, max_len=256), num_blocks=32, max_num_batched_tokens=32,
                      prefix_caching=False)
    worst = _engine_vs_hf(eng, hf, texts, new=4)
    hf_moe = AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe"), dtype=torch.float32).eval()
    worst_hf = max(float((_hf_logits(hf_moe, t) - _hf_logits(hf, t)).abs().max()) for t in texts.values())
    # the router is not idle: tokens spread over the experts
    x = torch.randn(64, cfg.hidden_size)
    _, idx = build_model(moe, torch.float32, max_len=64).layers[0].mlp.route(x)
    assert len(idx.unique()) == 4
    print(f"upcycled tiny Llama: max |logit - dense| ours {worst:.2e}, HF {worst_hf:.2e}")
    assert worst <= TOL and worst_hf <= TOL


def test_upcycled_smollm2_equals_dense(smol_ckpt, smol_fp32, gpl_ids):
    """The real embedded SmolLM2 (Q4_1 dequantized, fp32) upcycled to 4 experts, top-2."""
    from bastion.engine.models.upcycle import upcycle

    t0 = time.perf_counter()
    cfg, w = upcycle(smol_ckpt.arch, smol_ckpt.weights, num_experts=4, top_k=2, seed=0)
    moe = build_model(types.SimpleNamespace(arch=ModelArch.from_hf_config(cfg), weights=w), torch.float32, max_len=128)
    got = one_shot_logits(moe, gpl_ids)
    ref = one_shot_logits(smol_fp32, gpl_ids)
    worst = float((got - ref).abs().max())
    print(f"upcycled SmolLM2 (4 experts, top-2): max |logit - dense| {worst:.2e}, {time.perf_counter() - t0:.1f} s")
    assert float(ref.std()) > 1.0 and worst <= TOL


def test_upcycle_arguments_are_checked():
    from transformers import LlamaConfig, Qwen2Config

    from bastion.engine.models.upcycle import upcycle

    llama = ModelArch.from_hf_config(LlamaConfig(**_COMMON, intermediate_size=96))
    for kw in (dict(num_experts=0), dict(num_experts=2, top_k=3), dict(num_experts=2, routers=[torch.zeros(2, 8)])):
        with pytest.raises(ValueError):
            upcycle(llama, {}, **kw)
    with pytest.raises(ValueError, match="Llama or Mistral"):
        upcycle(ModelArch.from_hf_config(Qwen2Config(**_COMMON, intermediate_size=96)), {}, 2)


# ------------------------------------------------------------------ what is refused
def test_moe_configs_are_checked():
    from transformers import MixtralConfig, Qwen3MoeConfig

    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelArch.from_hf_config(MixtralConfig(**_COMMON, num_local_experts=2, num_experts_per_tok=3))
    with pytest.raises(ValueError, match="decoder_sparse_step"):
        ModelArch.from_hf_config(Qwen3MoeConfig(**_COMMON, num_experts=4, num_experts_per_tok=2,
                                                decoder_sparse_step=0))


def test_lora_on_experts_is_refused_attention_lora_installs(tmp_path):
    import json

    from safetensors.torch import save_file

    from bastion.config import AdapterConfig
    from bastion.engine.lora.linear import install
    from bastion.engine.lora.peft import AdapterError, load_peft_adapter
    from bastion.engine.lora.registry import AdapterRegistry
    from bastion.engine.models.llama import LlamaForCausalLM

    arch = ModelArch.from_hf_config(_configs()["mixtral"])
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    pre = "base_model.model.model.layers.0."
    save_file({pre + "mlp.gate_proj.lora_A.weight": torch.zeros(2, 64),
               pre + "mlp.gate_proj.lora_B.weight": torch.zeros(64, 2)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="mixture-of-experts"):
        load_peft_adapter("x", tmp_path, arch)
    model = LlamaForCausalLM(arch, 64)
    install(model, AdapterRegistry(arch, AdapterConfig(enabled=True, max_loras=1, max_lora_rank=2), torch.float32,
                                   torch.device("cpu")))
    assert type(model.layers[0].qkv_proj).__name__ == "LoraLinear" and not hasattr(model.layers[0], "gate_up_proj")


def test_bf16_moe_runs_close_to_fp32(tmp_path):
    """bf16 activations and experts (the dense default where oneDNN runs bf16): finite, and
    the same next-token argmax as HF fp32 on most rows (bf16 flips some near-tied routing
    choices, as HF's own bf16 does)."""
    cfg = _configs()["qwen2_moe"]
    hf = _hf_model(cfg, seed=1)
    hf.save_pretrained(str(tmp_path))
    model = build_model(load_checkpoint(str(tmp_path), show_progress=False), torch.bfloat16, max_len=128)
    assert model.layers[0].mlp.experts.gate_up.dtype == torch.bfloat16
    ids = _texts([40], 0)["s0"]
    got, ref = one_shot_logits(model, ids), _hf_logits(hf, ids)
    assert torch.isfinite(got).all()
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.85
