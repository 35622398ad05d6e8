"""Multi-LoRA serving: our fused, batched LoRA deltas against PEFT on HF transformers.

Tiny random Llama (shapes are all that matter for the math); the adapters get random,
non-zero B (PEFT's init_lora_weights=False) so a wrong slice or scale shows.
"""

from __future__ import annotations

import json

import pytest
import torch

from bastion.engine.lora.batch import LoraBatch
from bastion.engine.lora.peft import AdapterError, load_peft_adapter
from bastion.engine.models.arch import ModelArch
from bastion.engine.sampling_params import SamplingParams

from tests.support.engines import run_engine, tiny_llama_config
from tests.support.lora import ALL, engine_on, hf_greedy, peft_adapter

peft = pytest.importorskip("peft")


def test_prompt_logprobs_match_peft_with_mixed_ranks_and_partial_targets(hf_base, tmp_path):
    peft_model, path = peft_adapter(hf_base, tmp_path, "a", 1, r=8, lora_alpha=16, target_modules=ALL,
                                rank_pattern={"k_proj": 4}, alpha_pattern={"down_proj": 4})
    engine = engine_on(hf_base)
    engine.adapters.load("a", str(path))
    ids = torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.add_request("x", ids, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), adapter="a")
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    with torch.no_grad():
        ref = torch.log_softmax(peft_model(torch.tensor([ids])).logits[0].float(), -1)
    ours = torch.tensor([outs[0].prompt_logprobs[i].logprob for i in range(1, len(ids))])
    expect = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert (ours - expect).abs().max() < 1e-4


def test_mixed_batch_of_adapters_and_base_matches_each_alone(hf_base, tmp_path):
    """One batch: two adapters of different ranks/targets and the base model; each
    request's greedy output equals PEFT's (or plain HF's) for it."""
    pa, path_a = peft_adapter(hf_base, tmp_path, "a", 2, r=4, lora_alpha=8, target_modules=ALL)
    pb, path_b = peft_adapter(hf_base, tmp_path, "b", 3, r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                          use_rslora=True)
    engine = engine_on(hf_base)
    engine.adapters.load("a", str(path_a))
    engine.adapters.load("b", str(path_b))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (9, 23, 17)]
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    for name, model in (("a", pa), ("b", pb), (None, hf_base)):
        for i, ids in enumerate(prompts):
            engine.add_request(f"{name}-{i}", ids, p, adapter=name)
    res = {}
    while engine.has_unfinished():
        for o in engine.step():
            res.setdefault(o.request_id, []).extend(o.new_token_ids)
    for name, model in (("a", pa), ("b", pb), (None, hf_base)):
        for i, ids in enumerate(prompts):
            assert res[f"{name}-{i}"] == hf_greedy(model, ids, 6), (name, i)
    assert engine.block_manager.num_used_blocks == 0


def test_adapter_prefix_cache_is_separate_from_base(hf_base, tmp_path):
    _, path = peft_adapter(hf_base, tmp_path, "a", 4, r=4, lora_alpha=8, target_modules=ALL)
    engine = engine_on(hf_base)
    engine.adapters.load("a", str(path))
    ids = list(range(3, 60))
    p = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    base = run_engine(engine, [ids], p, prefix="base")["base0"]
    engine.add_request("lora", ids, p, adapter="a")
    first = None
    while engine.has_unfinished():
        for o in engine.step():
            first = o.num_cached_prompt_tokens if first is None else first
    assert base["cached"] == 0 and first == 0  # the base's cached blocks are not the adapter's


def test_unload_frees_the_slot_and_refuses_while_in_use(hf_base, tmp_path):
    _, path = peft_adapter(hf_base, tmp_path, "a", 5, r=4, lora_alpha=8, target_modules=ALL)
    engine = engine_on(hf_base)
    engine.adapters.load("a", str(path))
    engine.add_request("busy", [5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True), adapter="a")
    engine.step()
    with pytest.raises(ValueError, match="serving requests"):
        engine.unload_adapter("a")
    engine.abort_request("busy")
    engine.unload_adapter("a")
    assert not engine.adapters.slot_of
    assert all(float(A.abs().sum()) == 0 and all(float(B.abs().sum()) == 0 for _, B in Bs)
               for A, Bs in engine.adapters.stacks.values())
    with pytest.raises(AdapterError):
        engine.add_request("gone", [5, 6], SamplingParams(), adapter="a")


def test_bad_adapters_are_refused_with_the_reason(hf_base, tmp_path):
    arch = ModelArch.from_hf_config(hf_base.config)
    _, path = peft_adapter(hf_base, tmp_path, "a", 6, r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match="adapter_config.json"):
        load_peft_adapter("x", tmp_path / "missing", arch)
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(AdapterError, match="rank 4, config says 8"):
        load_peft_adapter("x", path, arch)
    small = ModelArch.from_hf_config(tiny_llama_config(num_hidden_layers=1))
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="layer 1"):
        load_peft_adapter("x", path, small)
    engine = engine_on(hf_base)
    with pytest.raises(AdapterError, match="max-lora-rank"):
        _, big = peft_adapter(hf_base, tmp_path, "big", 7, r=32, lora_alpha=8, target_modules=["q_proj"])
        engine.adapters.load("big", str(big))


def test_lora_batch_groups_rows_by_slot():
    cpu = torch.device("cpu")
    # single rows on scattered slots: one padded gather group over slots 1..3
    (g,) = LoraBatch.build([(0, 1), (3, 1), (1, 1), (3, 1), (0, 1), (3, 1)], cpu).groups
    assert (g.lo, g.hi, g.m) == (1, 3, 3)  # slot 2 is in range but unused: empty row, dropped
    assert g.gather.tolist() == [[2, 0, 0], [0, 0, 0], [1, 3, 5]]
    assert g.rows.tolist() == [2, 1, 3, 5] and g.keep.tolist() == [0, 6, 7, 8]
    # decodes sorted by slot, then two prompt chunks: three contiguous groups, nothing padded
    dec, c1, c2 = LoraBatch.build([(1, 1), (2, 1), (3, 1), (2, 5), (0, 4), (3, 7)], cpu).groups
    assert (dec.lo, dec.hi, dec.m, dec.start, dec.gather) == (1, 3, 1, 0, None)
    assert (c1.lo, c1.hi, c1.m, c1.start, c1.gather) == (2, 2, 5, 3, None)
    assert (c2.lo, c2.hi, c2.m, c2.start, c2.gather) == (3, 3, 7, 12, None)
    # several decodes per slot, sorted: still one contiguous group; uneven counts: gathered
    (same,) = LoraBatch.build([(0, 1), (2, 1), (2, 1), (3, 1), (3, 1)], cpu).groups
    assert (same.lo, same.hi, same.m, same.start, same.gather) == (2, 3, 2, 1, None)
    (uneven,) = LoraBatch.build([(2, 1), (2, 1), (3, 1)], cpu).groups
    assert uneven.gather.tolist() == [[0, 1], [2, 0]] and uneven.keep.tolist() == [0, 1, 2]
    assert LoraBatch.build([(0, 1), (0, 9)], cpu) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("subs", [None, (0, 2)])
def test_add_lora_matches_per_row_reference_on_mixed_batches(subs, dtype):
    """Every grouping (contiguous decodes, gathered decodes, prompt chunks, base rows)
    adds exactly x_row @ A[slot] @ B_i[slot] into each targeted sub-module's columns.
    bf16 activations (the served dtype; fp32 factors) take the 16-bit GEMM path for
    chunks of >= PROMPT_ROWS rows: checked to bf16 rounding of the delta."""
    from bastion.engine.lora.batch import PROMPT_ROWS, add_lora

    g = torch.Generator().manual_seed(0)
    slots, r, d_in, outs = 5, 3, 6, (4, 2, 2)
    A = torch.randn(slots, d_in, r * len(outs), generator=g)
    Bs, col = [], 0
    for o in outs:
        Bs.append((col, torch.randn(slots, r, o, generator=g)))
        col += o
    A[0], Bs[0][1][0], Bs[1][1][0], Bs[2][1][0] = 0, 0, 0, 0  # slot 0 = no adapter
    big = PROMPT_ROWS + 3
    for segments in ([(1, 1), (2, 1), (3, 1), (4, 1)], [(3, 1), (1, 1), (3, 1), (0, 1)],
                     [(1, 1), (2, 1), (2, 5), (0, 3), (4, 2)], [(0, 2), (4, 6)],
                     [(1, 1), (3, 1), (2, big), (0, 3), (4, PROMPT_ROWS)],
                     [(0, 1), (2, 1), (2, 1), (3, 1), (3, 1)], [(2, 1), (2, 1), (3, 1), (1, 4)],
                     # >= PROMPT_ROWS single rows of one slot, not consecutive: a gathered group
                     [(2, 1), (0, 1)] + [(2, 1)] * PROMPT_ROWS):
        row_slots = [s for s, n in segments for _ in range(n)]
        x = torch.randn(len(row_slots), d_in, generator=g).to(dtype)
        want = torch.zeros(len(row_slots), col)
        for i, s in enumerate(row_slots):
            t = x[i].float() @ A[s]
            for j in (subs or range(len(outs))):
                c, B = Bs[j]
                want[i, c : c + B.shape[2]] += t[j * r : (j + 1) * r] @ B[s]
        got = torch.zeros(want.shape, dtype=dtype)
        add_lora(got, x, A, Bs, LoraBatch.build(segments, torch.device("cpu")), subs)
        tol = 1e-5 if dtype == torch.float32 else 3e-2 * float(want.abs().max())
        torch.testing.assert_close(got.float(), want, rtol=0, atol=tol)


def test_step_plan_skips_modules_no_adapter_targets(hf_base, tmp_path):
    """Only the (layer, module, sub-module) triples some adapter of the batch targets are
    computed; skipping the others must not change a delta (checked against the full sum)."""
    from bastion.engine.lora.batch import add_lora

    _, path_qv = peft_adapter(hf_base, tmp_path, "qv", 8, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          layers_to_transform=[1])
    _, path_mlp = peft_adapter(hf_base, tmp_path, "mlp", 9, r=4, lora_alpha=8, target_modules=["down_proj"])
    engine = engine_on(hf_base)
    reg = engine.adapters
    reg.load("qv", str(path_qv))
    reg.load("mlp", str(path_mlp))
    s_qv, s_mlp = reg.slot("qv"), reg.slot("mlp")
    assert reg.plan(frozenset({s_qv})) == {(1, "qkv_proj"): (0, 2)}
    both = reg.plan(frozenset({s_qv, s_mlp}))
    assert both[(1, "qkv_proj")] == (0, 2) and both[(0, "down_proj")] == (0,) and (0, "qkv_proj") not in both
    # the skipped-sub-module path equals the all-sub-modules path on q/v-only weights
    A, Bs = reg.stacks[(1, "qkv_proj")]
    batch = LoraBatch.build([(s_qv, 1), (0, 1), (s_qv, 1)], torch.device("cpu"))
    x = torch.randn(3, A.shape[1])
    full, part = torch.zeros(3, sum(b.shape[2] for _, b in Bs)), torch.zeros(3, sum(b.shape[2] for _, b in Bs))
    add_lora(full, x, A, Bs, batch)
    add_lora(part, x, A, Bs, batch, (0, 2))
    assert full.abs().sum() > 0 and full[1].abs().sum() == 0
    torch.testing.assert_close(part, full, rtol=1e-6, atol=1e-6)
    reg.unload("qv")
    assert reg.plan(frozenset({s_qv})) == {}
