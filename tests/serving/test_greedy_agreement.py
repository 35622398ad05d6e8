"""Quality is measured, not assumed: greedy answers of the served default path (SmolLM2's
GGUF kept quantized, fp32 activations) and of the opt-in int8-activation path against HF
transformers fp32 on the same file, over the project's chat prompt set. Required: >= 90%
of the answers equal token for token on the default path (measured: 100%), and "Paris"
for the capital of France (bf16 activations flip that near-tie). The int8 path measured
69%, so it stays opt-in; its test holds a floor."""

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
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    same = [o.token_ids == ref for o, ref in zip(outs, hf_answers)]
    return sum(same) / len(same), [CHAT_PROMPTS[i] for i, s in enumerate(same) if not s], outs[0].text


def test_int8_activation_path_answers_as_hf_fp32(hf_answers):
    from bastion.config import CacheConfig, Config, ModelConfig
    from bastion.serving.llm import LLM

    llm = LLM(Config(model=ModelConfig(max_model_len=1024, activations="int8"), cache=CacheConfig(num_blocks=128)),
              show_progress=False)
    agree, differ, paris = _agreement(llm, hf_answers)
    print(f"int8 activations: {agree:.0%} of the answers equal HF fp32's")
    # NOTE: measured 69% (16 prompts x 16 tokens): below the 90% bar, which is why int8
    # activations are opt-in; this floor catches a broken kernel, not rounding.
    assert agree >= 0.6, differ
    assert "Paris" in paris, paris
