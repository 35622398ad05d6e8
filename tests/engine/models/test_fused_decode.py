"""The whole-step decode (engine/models/fused_decode.py) against its oracle, the per-op
path: the same kernels in the same order, so tokens and logprobs must be bit-identical,
at batch 1 (integer activations) and batch 3 (fp32 kernel rows), on the real model."""

from __future__ import annotations

import pytest

from bastion.engine.models.fused_decode import FusedDecode
from bastion.engine.sampling_params import SamplingParams

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea and its long memory of ships.",
           "List three uses of the tar command."]


def _run(llm, prompts: list[str], tag: str) -> dict[int, list[tuple]]:
    eng = llm.engine
    for k, text in enumerate(prompts):
        ids = llm.tokenizer.encode(text)
        eng.add_request(f"{tag}-{k}", ids, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3))
    out: dict[int, list[tuple]] = {}  # request -> (token, logprob, top-3) per step
    while eng.has_unfinished():
        for o in eng.step():
            k = int(o.request_id.rsplit("-", 1)[1])
            for tok, lp in zip(o.new_token_ids, o.new_logprobs or []):
                out.setdefault(k, []).append((tok, lp.logprob, tuple(lp.top)))
    return out


@pytest.fixture()
def model(offline_llm):
    m = offline_llm.engine.runner.model
    if m.fused_decode is None:
        pytest.fail("the embedded (quantized, fp32) model has no fused decode plan: the native kernel did not build")
    return m


@pytest.mark.parametrize("n", [1, 3], ids=["batch1-int", "batch3-fp32"])
def test_fused_decode_is_bit_identical_to_the_per_op_path(offline_llm, model, monkeypatch, n):
    ran = []
    real_run = FusedDecode.run

    def counting_run(self, *a):
        ok = real_run(self, *a)
        ran.append(ok)
        return ok

    monkeypatch.setattr(FusedDecode, "run", counting_run)
    fused = _run(offline_llm, PROMPTS[:n], "fused")
    assert sum(ran) >= 10 and not all(ran), ran  # decode steps took it; prefill steps fell back
    plan, model.fused_decode = model.fused_decode, None
    try:
        per_op = _run(offline_llm, PROMPTS[:n], "perop")
    finally:
        model.fused_decode = plan
    assert fused == per_op and len(fused) == n and all(len(v) == 12 for v in fused.values())


def test_steps_it_cannot_run_fall_back(offline_llm, model):
    """Prefill rows, or more rows than the kernels take, go the per-op way (run says False)."""
    import torch

    from bastion.engine.kv_cache.base import AttentionMetadata

    x = torch.zeros(2, model.arch.hidden_size)
    cos = sin = torch.zeros(2, model.arch.head_dim)
    meta = AttentionMetadata(slot_mapping=torch.zeros(2, dtype=torch.long), num_decodes=1)  # a prefill row
    assert model.fused_decode.run(x, cos, sin, meta, offline_llm.engine.runner.kv) is False
    x = torch.zeros(17, model.arch.hidden_size)
    meta = AttentionMetadata(slot_mapping=torch.zeros(17, dtype=torch.long), num_decodes=17)
    assert model.fused_decode.run(x, cos, sin, meta, offline_llm.engine.runner.kv) is False
