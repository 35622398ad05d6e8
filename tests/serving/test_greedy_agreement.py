"""Quality is measured, not assumed: greedy answers of the served default path (SmolLM2's
GGUF kept quantized; decode and prefill with int16 activations where the CPU has VNNI,
fp32 otherwise), of the exact fp32-activation path and of the opt-in int8-activation path,
against HF transformers fp32 on the same file, over the project's chat prompt set. Each
prompt is answered alone, so decode takes the batch-1 kernels. Required: >= 90% of the
answers equal token for token (measured: 100% default and fp32), and "Paris" for the
capital of France (bf16 activations flip that near-tie). The int8 path measured 69%
(batched), so it stays opt-in; its test holds a floor."""

from __future__ import annotations

import pytest
import torch

from bastion.bench.chat_prompts import CHAT_PROMPTS
from bastion.engine.sampling_params import SamplingParams
from bastion.serving.chat_template import encode_chat

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def hf_answers(tokenizer):
    from transformers import AutoModelForCausalLM

    from bastion.engine.models.loader import embedded_model_path

    p = embedded_model_path()
    hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    answers = []
    with torch.no_grad():
        for prompt in CHAT_PROMPTS:
            ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}])
            out = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
            answers.append(out[0, len(ids):].tolist())
    del hf
    return answers


def test_default_path_answers_as_hf_fp32(offline_llm, hf_answers):
    llm = offline_llm
    # the default keeps the file's quantized weights (98 MB file), reported in stats (/metrics)
    assert 0.05 * 2**30 < llm.engine.stats().weight_bytes < 0.15 * 2**30
    agree, differ, paris = _agreement(llm, hf_answers)
    print(f"default path: {agree:.0%} of the answers equal HF fp32's")
    assert agree >= 0.9, differ
    assert "Paris" in paris, paris


def _agreement(llm, hf_answers) -> tuple[float, list, str]:
    prompts = [encode_chat(llm.tokenizer, [{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    outs = [llm.generate([p], params)[0] for p in prompts]  # alone: batch-1 decode rows
    same = [o.token_ids == ref for o, ref in zip(outs, hf_answers)]
    return sum(same) / len(same), [CHAT_PROMPTS[i] for i, s in enumerate(same) if not s], outs[0].text


def _llm(activations: str):
    from bastion.config import CacheConfig, Config, ModelConfig
    from bastion.serving.llm import LLM

    return LLM(Config(model=ModelConfig(max_model_len=1024, activations=activations), cache=CacheConfig(num_blocks=128)),
               show_progress=False)


def test_fp32_activation_path_answers_as_hf_fp32(hf_answers):
    agree, differ, paris = _agreement(_llm("fp32"), hf_answers)
    print(f"fp32 activations: {agree:.0%} of the answers equal HF fp32's")
    assert agree >= 0.9, differ
    assert "Paris" in paris, paris


def test_int16_activation_path_answers_as_hf_fp32(hf_answers):
    """--activations int16 named (auto's choice where VNNI is; named, on any CPU)."""
    agree, differ, paris = _agreement(_llm("int16"), hf_answers)
    print(f"int16 activations: {agree:.0%} of the answers equal HF fp32's")
    assert agree >= 0.9, differ
    assert "Paris" in paris, paris


def test_int8_activation_path_answers_as_hf_fp32(hf_answers):
    agree, differ, paris = _agreement(_llm("int8"), hf_answers)
    print(f"int8 activations: {agree:.0%} of the answers equal HF fp32's")
    # NOTE: measured 62-75% (16 prompts x 16 tokens, alone; prompts in int16): below the 90%
    # bar, which is why int8 activations are opt-in; this floor catches a broken kernel, not rounding.
    assert agree >= 0.5, differ
