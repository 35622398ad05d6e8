"""The engine end to end on the real SmolLM2-135M-Instruct: finish conditions, stop
strings and token ids, ignore_eos / min_tokens, logprobs and prompt logprobs (against
the HF fp32 oracle), prefix caching, seeds, request validation and abort.

Greedy outputs quoted below were observed with the bf16 `offline_llm`; the tests assert
relations between runs (not these literals) wherever numerics could matter."""

from __future__ import annotations

import math

import pytest
import torch

from bastion.engine import attention
from bastion.engine.outputs import PromptTooLongError
from bastion.engine.sampling_params import SamplingParams

from tests.support.engines import assert_pool_clean, make_engine, run_engine

from tests.support.text import gpl_text

EOS = 2  # <|im_end|>
COMMA = 28


def chat(tok, text: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def numbers_prompt(offline_llm):
    # greedy: '1, 2, 3, 4, 5, 6, 7, 8, 9, 10' + <|im_end|>, one token per digit/','/' '
    return chat(offline_llm.tokenizer, "List the numbers from 1 to 10, separated by commas.")


@pytest.fixture(scope="module")
def cats_prompt(offline_llm):
    # greedy: 'A cat is a majestic creature with a fluffy coat, a playful personality, ...' + EOS
    return chat(offline_llm.tokenizer, "Write one short sentence about cats.")


@pytest.fixture(scope="module")
def numbers_greedy(offline_llm, numbers_prompt):
    (c,) = offline_llm.generate([numbers_prompt], SamplingParams(max_tokens=60, temperature=0))
    assert c.finish_reason == "stop" and c.token_ids[-1] == EOS
    assert c.text.startswith("1, 2, 3, 4, 5")
    return c


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, **kw)


# ------------------------------------------------------------------ finish conditions
def test_eos_finishes_with_stop_and_no_special_text(numbers_greedy):
    assert "<|im_end|>" not in numbers_greedy.text
    assert EOS not in numbers_greedy.token_ids[:-1]


def test_max_tokens_gives_length(offline_llm, numbers_prompt, numbers_greedy):
    (c,) = offline_llm.generate([numbers_prompt], greedy(max_tokens=5))
    assert c.finish_reason == "length"
    assert c.token_ids == numbers_greedy.token_ids[:5]
    assert c.text == "1, 2,"
    assert offline_llm.engine.block_manager.num_used_blocks == 0


def test_ignore_eos_gives_fixed_length(offline_llm, numbers_prompt, numbers_greedy, cats_prompt):
    n = len(numbers_greedy.token_ids)
    outs = offline_llm.generate([numbers_prompt, cats_prompt], greedy(max_tokens=n + 12, ignore_eos=True))
    for c in outs:
        assert c.finish_reason == "length" and len(c.token_ids) == n + 12
    # identical up to and including the EOS it generated and ignored
    assert outs[0].token_ids[:n] == numbers_greedy.token_ids
    assert EOS in outs[1].token_ids[:-1]


def test_min_tokens_masks_eos(offline_llm, cats_prompt):
    (free,) = offline_llm.generate([cats_prompt], greedy(max_tokens=60))
    assert free.finish_reason == "stop" and free.token_ids[-1] == EOS
    k = len(free.token_ids)
    (c,) = offline_llm.generate([cats_prompt], greedy(max_tokens=60, min_tokens=k + 4))
    assert len(c.token_ids) >= k + 4
    assert EOS not in c.token_ids[: k + 3]
    assert c.token_ids[: k - 1] == free.token_ids[:-1]  # only the EOS position changed
    assert c.token_ids[k - 1] != EOS


def test_min_tokens_masks_stop_token_ids(offline_llm, cats_prompt):
    (first,) = offline_llm.generate([cats_prompt], greedy(max_tokens=40, stop_token_ids=(COMMA,)))
    assert first.finish_reason == "stop" and first.token_ids[-1] == COMMA
    k = len(first.token_ids)
    (c,) = offline_llm.generate([cats_prompt], greedy(max_tokens=40, stop_token_ids=(COMMA,), min_tokens=k + 1))
    assert len(c.token_ids) >= k + 1
    assert COMMA not in c.token_ids[:k]


def test_stop_token_ids(offline_llm, numbers_prompt, numbers_greedy):
    (c,) = offline_llm.generate([numbers_prompt], greedy(max_tokens=40, stop_token_ids=(COMMA, 999)))
    assert c.finish_reason == "stop"
    assert c.token_ids == numbers_greedy.token_ids[:2]  # '1', ','
    assert c.text == "1,"  # like vLLM: a non-special stop token stays in the text


# ------------------------------------------------------------------ stop strings
def test_stop_string_split_across_tokens(offline_llm, numbers_prompt):
    # '4, 5' spans the tokens '4' ',' ' ' '5'
    (c,) = offline_llm.generate([numbers_prompt], greedy(max_tokens=40, stop=("4, 5",)))
    assert c.finish_reason == "stop" and c.text == "1, 2, 3, "
    (c,) = offline_llm.generate([numbers_prompt], greedy(max_tokens=40, stop=("4, 5",), include_stop_str_in_output=True))
    assert c.finish_reason == "stop" and c.text == "1, 2, 3, 4, 5"
    assert offline_llm.engine.block_manager.num_used_blocks == 0  # the stopped request was freed


def test_earliest_of_several_stop_strings_wins(offline_llm, numbers_prompt):
    (c,) = offline_llm.generate([numbers_prompt], greedy(max_tokens=40, stop=("7", "3, 4", "never")))
    assert c.text == "1, 2, " and c.finish_reason == "stop"


def test_stop_string_absent_changes_nothing(offline_llm, numbers_prompt, numbers_greedy):
    (c,) = offline_llm.generate([numbers_prompt], greedy(max_tokens=60, stop=("xyz", "11")))
    assert c.text == numbers_greedy.text and c.finish_reason == "stop" and c.token_ids == numbers_greedy.token_ids


def test_stop_string_completed_by_the_last_allowed_token_reports_stop(offline_llm, numbers_prompt):
    """'3' is the 7th token: with max_tokens=7 the stop string and the length limit are hit
    by the same token. As in vLLM, the stop string wins (text trimmed, reason 'stop')."""
    (c,) = offline_llm.generate([numbers_prompt], greedy(max_tokens=7, stop=("3",)))
    assert c.text == "1, 2, "
    assert c.finish_reason == "stop"


# ------------------------------------------------------------------ logprobs
def test_logprobs_top_n_consistent(offline_llm, cats_prompt):
    (c,) = offline_llm.generate([cats_prompt], greedy(max_tokens=8, logprobs=4))
    assert len(c.logprobs) == len(c.token_ids) == 8
    for tok, lp in zip(c.token_ids, c.logprobs):
        assert lp.token_id == tok and lp.rank == 1  # greedy picks a top token
        assert len(lp.top) == 4
        vals = [v for _, v in lp.top]
        assert vals == sorted(vals, reverse=True) and all(v <= 0 for v in vals)
        # bf16 logits tie often: top[0] may be another token with the very same logprob
        assert tok in [t for t, _ in lp.top] and lp.top[0][1] == lp.logprob
        assert sum(math.exp(v) for v in vals) <= 1 + 1e-4


def test_prompt_logprobs_alignment_and_hf_oracle(offline_llm, gpl_ids, hf_smol_logits):
    """Entry 0 is None; entry i is the logprob of prompt token i given tokens < i. bf16
    engine vs the fp32 HF oracle: close, not equal."""
    (c,) = offline_llm.generate([gpl_ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3))
    plp = c.prompt_logprobs
    assert plp is not None and len(plp) == 64 and plp[0] is None
    ref = torch.log_softmax(hf_smol_logits, dim=-1)
    errs = []
    for i in range(1, 64):
        e = plp[i]
        assert e is not None and e.token_id == gpl_ids[i]
        assert len(e.top) == 3 and [v for _, v in e.top] == sorted((v for _, v in e.top), reverse=True)
        assert e.rank == 1 + sum(v > e.logprob for _, v in e.top) or e.rank > 3
        errs.append(abs(e.logprob - float(ref[i - 1, gpl_ids[i]])))
    assert max(errs) < 0.5 and sum(errs) / len(errs) < 0.1, (max(errs), sum(errs) / len(errs))


def test_prompt_logprobs_exact_in_fp32_through_chunks(smol_fp32, gpl_ids, hf_smol_logits):
    """fp32 engine, 20-token budget (prompt computed in 4 chunks): prompt logprobs and
    ranks equal the HF oracle's log_softmax (1e-3)."""
    eng = make_engine(smol_fp32, num_blocks=8, max_num_batched_tokens=20)
    res = run_engine(eng, [gpl_ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2, logprobs=2))
    plp = res["r0"]["prompt_logprobs"]
    ref = torch.log_softmax(hf_smol_logits, dim=-1)
    assert len(plp) == 64 and plp[0] is None
    for i in range(1, 64):
        row = ref[i - 1]
        assert abs(plp[i].logprob - float(row[gpl_ids[i]])) < 1e-3
        assert plp[i].rank == int((row > row[gpl_ids[i]]).sum()) + 1
        assert [t for t, _ in plp[i].top] == row.topk(2).indices.tolist()
    # the sampled token's logprob is the last row's
    lp = res["r0"]["logprobs"][0]
    assert lp.token_id == int(ref[63].argmax()) and abs(lp.logprob - float(ref[63].max())) < 1e-3


def test_prompt_logprobs_complete_on_prefix_cache_hit(offline_llm, tokenizer):
    """The same prompt twice (echo + logprobs, e.g. perplexity through the API): the second
    request hits the prefix cache, but every prompt position must still get its logprob."""
    ids = tokenizer.encode(gpl_text("  Developers that use the GNU GPL protect your rights"))[:50]
    p = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    first, second = (offline_llm.generate([ids], p)[0] for _ in range(2))
    assert all(e is not None for e in first.prompt_logprobs[1:])
    missing = [i for i, e in enumerate(second.prompt_logprobs) if e is None and i > 0]
    assert missing == [], f"prompt positions without logprobs on a cache hit: {missing}"


# ------------------------------------------------------------------ prefix caching
def test_prefix_caching_same_output_and_reports_cached_tokens(offline_llm, tokenizer):
    eng = offline_llm.engine
    ids = tokenizer.encode(gpl_text("  For the developers' and authors' protection"))[:45]
    p = greedy(max_tokens=12, ignore_eos=True)
    first = run_engine(eng, [ids], p, prefix="pc-a")["pc-a0"]
    second = run_engine(eng, [ids], p, prefix="pc-b")["pc-b0"]
    assert first["cached"] == 0
    assert second["cached"] == 32  # 2 full blocks; the block with the last token is recomputed
    assert second["tokens"] == first["tokens"]
    # a longer prompt sharing the head gets it from the cache as well
    third = run_engine(eng, [ids + [198, 504]], greedy(max_tokens=2), prefix="pc-c")["pc-c0"]
    assert third["cached"] == 32
    # another namespace (salt) does not see these blocks
    salted = run_engine(eng, [ids], p, prefix="pc-d", cache_salt="tenant-2")["pc-d0"]
    assert salted["cached"] == 0 and salted["tokens"] == first["tokens"]
    assert eng.block_manager.num_used_blocks == 0


def test_prefix_caching_concurrent_requests_share_blocks(offline_llm, tokenizer):
    eng = offline_llm.engine
    head = tokenizer.encode(gpl_text("  Some devices are designed to deny users"))[:48]
    run_engine(eng, [head + [13]], greedy(max_tokens=1), prefix="warm")
    eng.add_request("s1", head + [28, 260], greedy(max_tokens=3))
    eng.add_request("s2", head + [30, 198, 504], greedy(max_tokens=3))
    eng.step()
    r1, r2 = eng.requests["s1"], eng.requests["s2"]
    assert r1.num_cached_tokens == r2.num_cached_tokens == 48
    assert r1.tracks[0].block_ids[:3] == r2.tracks[0].block_ids[:3]
    assert all(eng.block_manager.ref_count[b] == 2 for b in r1.tracks[0].block_ids[:3])
    while eng.has_unfinished():
        eng.step()
    assert eng.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("block_size", [16, 4])
def test_short_chunks_after_a_cached_head_answer_as_they_do_alone(smol_fp32, tokenizer, block_size, monkeypatch):
    """The vetting scan's traffic: many requests that share a cached head and differ in a
    few tokens, prefilled in one step as padded batches of short chunks (attention.py),
    answer what each answers alone: same greedy tokens, logprobs within fp32 noise."""
    head = tokenizer.encode(gpl_text("  Some devices are designed to deny users"))[:43]
    tails = [[28], [30, 198], [13, 260, 504], [28, 30, 198, 13], [260], [504, 13, 28, 30, 198, 260, 13]]
    p = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=0)
    eng = make_engine(smol_fp32, num_blocks=96, block_size=block_size)
    run_engine(eng, [head], greedy(max_tokens=1), prefix="warm")
    alone = [run_engine(eng, [head + t], p, prefix=f"a{i}-")[f"a{i}-0"] for i, t in enumerate(tails)]
    import bastion.engine.kv_cache.fp as fp

    batched = []

    def spy(q, *a, **k):
        batched.append(q.shape[0])
        return attention.batched_prefill_attention(q, *a, **k)

    monkeypatch.setattr(fp, "batched_prefill_attention", spy)
    together = run_engine(eng, [head + t for t in tails], p, prefix="b")
    assert batched  # the chunks did run as a batch
    for i, a in enumerate(alone):
        b = together[f"b{i}"]
        assert b["cached"] > 0 and b["tokens"] == a["tokens"]
        for x, y in zip(a["logprobs"], b["logprobs"]):
            assert abs(x.logprob - y.logprob) <= 1e-4
    assert_pool_clean(eng.block_manager)


# ------------------------------------------------------------------ seeds
def test_seeded_sampling_is_reproducible(offline_llm, cats_prompt):
    p = lambda s: SamplingParams(max_tokens=16, temperature=1.0, seed=s, ignore_eos=True)  # noqa: E731
    a = offline_llm.generate([cats_prompt], p(7))[0].token_ids
    b = offline_llm.generate([cats_prompt], p(7))[0].token_ids
    c = offline_llm.generate([cats_prompt], p(8))[0].token_ids
    assert a == b
    assert a != c


def test_seeded_sampling_independent_of_batch(smol_fp32, tokenizer):
    """A seeded request draws from its own generator: batching it with unseeded and other
    seeded requests changes nothing (fp32, so batch shape cannot move the logits; the bf16
    engine is not batch-invariant: 1-2 row GEMVs take the fp16 weight copies)."""
    prompt = tokenizer.encode(chat(tokenizer, "Write one short sentence about cats."))
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    alone = run_engine(make_engine(smol_fp32, num_blocks=32), [prompt], seeded)["r0"]["tokens"]
    batch = run_engine(make_engine(smol_fp32, num_blocks=32),
                       [prompt, prompt, prompt[:-4], prompt],
                       [SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True), seeded,
                        SamplingParams(max_tokens=5, temperature=0.7, seed=3),
                        SamplingParams(max_tokens=12, temperature=1.0, seed=8, ignore_eos=True)])
    assert batch["r1"]["tokens"] == alone
    assert batch["r3"]["tokens"] != alone


# ------------------------------------------------------------------ requests
def test_add_request_validation(offline_llm):
    eng = offline_llm.engine
    with pytest.raises(ValueError):
        eng.add_request("v-empty", [], greedy())
    with pytest.raises(ValueError):
        eng.add_request("v-oov", [1, 49152], greedy())
    with pytest.raises(ValueError):
        eng.add_request("v-neg", [-1], greedy())
    with pytest.raises(PromptTooLongError):
        eng.add_request("v-long", [5] * 2048, greedy())
    with pytest.raises(PromptTooLongError):  # prompt + max_tokens beyond the pool (256 x 16)
        LLMish = make_engine(eng.runner.model, num_blocks=4)
        LLMish.add_request("v-pool", [5] * 40, greedy(max_tokens=30))
    eng.add_request("v-dup", [5, 6], greedy(max_tokens=1))
    with pytest.raises(ValueError, match="duplicate"):
        eng.add_request("v-dup", [5, 6], greedy(max_tokens=1))
    assert eng.abort_request("v-dup")
    assert not eng.has_unfinished()


def test_abort_mid_generation_frees_blocks_at_once(offline_llm, cats_prompt):
    eng = offline_llm.engine
    ids = offline_llm.tokenizer.encode(cats_prompt)
    eng.add_request("ab-1", ids, greedy(max_tokens=50, ignore_eos=True))
    eng.add_request("ab-2", ids[:-3], greedy(max_tokens=3))
    for _ in range(3):
        eng.step()
    assert eng.block_manager.num_used_blocks > 0
    assert eng.abort_request("ab-1")
    assert not eng.abort_request("ab-1")
    while eng.has_unfinished():
        assert all(o.request_id == "ab-2" for o in eng.step())
    assert eng.block_manager.num_used_blocks == 0
    assert all(c == 0 for c in eng.block_manager.ref_count)
    assert eng.stats().num_running == eng.stats().num_waiting == 0


def test_long_generation_reaches_max_model_len(smol_fp32):
    """A request that would run past max_model_len stops there with 'length'."""
    eng = make_engine(smol_fp32, num_blocks=8, max_model_len=40)
    res = run_engine(eng, [list(range(300, 330))], greedy(max_tokens=100, ignore_eos=True))["r0"]
    assert res["finish"] == "length" and len(res["tokens"]) == 10
    assert_pool_clean(eng.block_manager)
