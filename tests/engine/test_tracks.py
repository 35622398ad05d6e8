"""Tracks, through their first user, CleanGen: the reference track (base model, own KV)
runs in the same batch as the adapter's draft. Oracles: alpha -> 0 replaces every token the reference
would not have chosen, so greedy output equals the base model's; alpha -> inf never
replaces, so it equals the adapter's; neither disturbs other requests in the batch."""

from __future__ import annotations

import pytest
import torch

from bastion.engine.sampling_params import SamplingParams
from bastion.guard.cleangen import CleanGen

from tests.support.engines import assert_pool_clean
from tests.support.lora import engine_on, peft_adapter

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = [[5, 9, 13, 200, 17, 3, 99], [7, 7, 1, 400, 22]]


def _run(engine, prompts, adapter=None, filt=None, prefix="r"):
    out = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"{prefix}{i}", p, GREEDY, adapter=adapter,
                           token_filter=filt() if filt else None)
        out[f"{prefix}{i}"] = {"tokens": [], "replaced": 0}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id]["tokens"] += o.new_token_ids
            out[o.request_id]["replaced"] = o.num_replaced_tokens
    return [out[f"{prefix}{i}"] for i in range(len(prompts))]


@pytest.fixture
def engine(hf_base, tmp_path):
    eng = engine_on(hf_base)
    _, path = peft_adapter(hf_base, tmp_path, "bd", seed=3, r=8, target_modules=["q_proj", "v_proj", "down_proj"])
    eng.adapters.load("bd", str(path))
    return eng


def test_alpha_zero_gives_the_base_model_and_inf_the_adapter(engine):
    base = _run(engine, PROMPTS, prefix="b")
    lora = _run(engine, PROMPTS, adapter="bd", prefix="l")
    assert [b["tokens"] for b in base] != [l["tokens"] for l in lora]  # the adapter matters
    low = _run(engine, PROMPTS, adapter="bd", filt=lambda: CleanGen(alpha=1e-30), prefix="z")
    high = _run(engine, PROMPTS, adapter="bd", filt=lambda: CleanGen(alpha=1e30), prefix="i")
    assert [x["tokens"] for x in low] == [b["tokens"] for b in base]
    assert [x["tokens"] for x in high] == [l["tokens"] for l in lora]
    assert all(x["replaced"] == 0 for x in high)
    assert sum(x["replaced"] for x in low) > 0
    assert_pool_clean(engine.block_manager)


def test_defended_request_shares_the_batch_without_disturbing_others(engine):
    alone = _run(engine, PROMPTS[:1], adapter="bd", prefix="a") + _run(engine, PROMPTS[1:], prefix="c")
    rec: list[float] = []
    engine.add_request("d", PROMPTS[0], GREEDY, adapter="bd", token_filter=CleanGen(alpha=1e30, log_ratios=rec))
    engine.add_request("p", PROMPTS[1], GREEDY)
    toks = {"d": [], "p": []}
    max_rows = 0
    while engine.has_unfinished():
        batch_rows = len(engine.scheduler.running)
        max_rows = max(max_rows, batch_rows)
        for o in engine.step():
            toks[o.request_id] += o.new_token_ids
    assert toks["d"] == alone[0]["tokens"] and toks["p"] == alone[1]["tokens"]
    assert len(rec) == GREEDY.max_tokens  # one ratio per drafted token
    assert_pool_clean(engine.block_manager)


def test_reference_track_doubles_blocks_and_survives_preemption(hf_base, tmp_path):
    eng = engine_on(hf_base, num_blocks=6)  # two defended requests of 10 + 12 tokens need 2 x 2 tracks x 2 blocks
    _, path = peft_adapter(hf_base, tmp_path, "bd", seed=3, r=8, target_modules=["q_proj", "v_proj"])
    eng.adapters.load("bd", str(path))
    prompts = [list(range(3, 13)), list(range(40, 50))]
    ref = _run(eng, prompts, adapter="bd", filt=lambda: CleanGen(alpha=1e-30), prefix="x")
    assert eng.scheduler.num_preemptions >= 1
    solo = [_run(eng, [p], adapter="bd", filt=lambda: CleanGen(alpha=1e-30), prefix=f"s{i}")[0]
            for i, p in enumerate(prompts)]
    assert [r["tokens"] for r in ref] == [s["tokens"] for s in solo]
    assert_pool_clean(eng.block_manager)


def test_cleangen_needs_a_pool_that_fits_both_tracks(hf_base, tmp_path):
    engine = engine_on(hf_base, num_blocks=20)  # context 256 = 16 blocks: one track fits, two do not
    _, path = peft_adapter(hf_base, tmp_path, "bd", seed=3, r=8, target_modules=["q_proj"])
    engine.adapters.load("bd", str(path))
    from bastion.engine.outputs import PromptTooLongError

    big = SamplingParams(max_tokens=600, ignore_eos=True)
    engine.add_request("ok", PROMPTS[0], big, adapter="bd")
    engine.abort_request("ok")
    with pytest.raises(PromptTooLongError):
        engine.add_request("no", PROMPTS[0], big, adapter="bd", token_filter=CleanGen())


class _Recorder:
    """A token filter that changes nothing and keeps both logits of every token."""

    tracks = (None,)

    def __init__(self):
        self.rows = []

    def __call__(self, token, logits, track_logits, req):
        self.rows.append((token, logits.clone(), track_logits[0].clone()))
        return token


def _recorded(engine, prompts, adapter, prefix):
    recs = [_Recorder() for _ in prompts]
    cached = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"{prefix}{i}", p, GREEDY, adapter=adapter, token_filter=recs[i])
    while engine.has_unfinished():
        for o in engine.step():
            cached.setdefault(o.request_id, o.num_cached_prompt_tokens)
    return recs, [cached[f"{prefix}{i}"] for i in range(len(prompts))]


HEAD = list(range(100, 140))  # 40 tokens: 2 full blocks of 16 shared by the prompts below


@pytest.mark.parametrize("warm_base", [True, False])
def test_reference_track_uses_the_prefix_cache_and_matches_uncached(hf_base, tmp_path, warm_base):
    """A defended request's two tracks hit the prefix cache in their own namespaces (the
    adapter's, the base's) and only as far as both have the blocks: its tokens and both
    logits equal those of an engine without prefix caching."""
    _, path = peft_adapter(hf_base, tmp_path, "bd", seed=3, r=8, target_modules=["q_proj", "v_proj", "down_proj"])
    prompts = [HEAD + [5, 6, 7], HEAD + [9, 8]]
    out = {}
    for caching in (False, True):
        eng = engine_on(hf_base, prefix_caching=caching)
        eng.adapters.load("bd", str(path))
        _run(eng, [HEAD + [1]], adapter="bd", prefix="wa")  # the adapter's namespace holds the head
        if warm_base:
            _run(eng, [HEAD + [2]], prefix="wb")             # and the base's
        out[caching] = _recorded(eng, prompts, "bd", "d")
        assert_pool_clean(eng.block_manager)
    (plain, c0), (hit, c1) = out[False], out[True]
    assert c0 == [0, 0] and c1 == ([32, 32] if warm_base else [0, 0])
    for a, b in zip(plain, hit):
        assert [t for t, _, _ in a.rows] == [t for t, _, _ in b.rows]
        for (_, la, ra), (_, lb, rb) in zip(a.rows, b.rows):
            assert torch.allclose(la, lb, atol=1e-4) and torch.allclose(ra, rb, atol=1e-4)


def test_a_reloaded_adapter_name_never_hits_the_old_adapters_kv(hf_base, tmp_path):
    _, p1 = peft_adapter(hf_base, tmp_path, "a1", seed=3, r=8, target_modules=["q_proj", "v_proj"])
    _, p2 = peft_adapter(hf_base, tmp_path, "a2", seed=4, r=8, target_modules=["q_proj", "v_proj"])
    prompt = HEAD + [5, 6]
    fresh = engine_on(hf_base)
    fresh.adapters.load("x", str(p2))
    want = _run(fresh, [prompt], adapter="x", prefix="f")[0]["tokens"]
    eng = engine_on(hf_base)
    eng.adapters.load("x", str(p1))
    old = _run(eng, [prompt], adapter="x", prefix="o")[0]["tokens"]
    eng.unload_adapter("x")
    eng.adapters.load("x", str(p2))
    eng.add_request("n", prompt, GREEDY, adapter="x")
    toks, cached = [], None
    while eng.has_unfinished():
        for o in eng.step():
            toks += o.new_token_ids
            cached = o.num_cached_prompt_tokens if cached is None else cached
    assert old != want and toks == want
    assert cached == 0  # the head cached under the old "x" is not this adapter's KV


def test_tracks_on_the_quantized_cache_each_get_their_own_window(hf_base, tmp_path):
    """With the KIVI pool every track holds its own sequence slot (fp window) and blocks:
    the same oracles hold (alpha -> 0: the base model, alpha -> inf: the adapter, both on
    that cache), and every slot comes back."""
    eng = engine_on(hf_base, kivi=True)
    _, path = peft_adapter(hf_base, tmp_path, "bd", seed=3, r=8, target_modules=["q_proj", "v_proj", "down_proj"])
    eng.adapters.load("bd", str(path))
    prompts = [list(range(3, 30)), [7, 7, 1, 400, 22]]
    base = _run(eng, prompts, prefix="b")
    lora = _run(eng, prompts, adapter="bd", prefix="l")
    low = _run(eng, prompts, adapter="bd", filt=lambda: CleanGen(alpha=1e-30), prefix="z")
    high = _run(eng, prompts, adapter="bd", filt=lambda: CleanGen(alpha=1e30), prefix="i")
    assert [b["tokens"] for b in base] != [x["tokens"] for x in lora]
    assert [x["tokens"] for x in low] == [b["tokens"] for b in base]
    assert [x["tokens"] for x in high] == [x["tokens"] for x in lora]
    assert_pool_clean(eng.block_manager)
    assert sorted(eng.block_manager.free_seq_slots) == [0, 1, 2, 3]
