"""`bastion bench guard`'s pieces: the run-length oracle, the per-token replay through
the server's guard code path on the real tokenizer, and the summary's arithmetic."""

from __future__ import annotations

import pytest

from bastion.bench.guard import ATTACKS, BENIGN, SYSTEMS, _shown, _token_outputs, longest_run, markdown, summarize
from bastion.guard.leak import LeakGuard, Protected


def test_longest_run_counts_consecutive_shared_words():
    assert longest_run("Well: you are ARIA, the bot.", "You are Aria, the support bot") == 4
    assert longest_run("nothing shared", "You are Aria") == 0


def test_every_system_prompt_holds_its_canary_and_is_long_enough_to_guard():
    assert len(ATTACKS) == len(BENIGN) == 12
    for system, canary in SYSTEMS:
        assert canary in system and Protected.system_prompt(system, 8) is not None


def test_replay_on_real_tokens_cuts_a_leak_and_passes_an_answer(offline_llm):
    tok = offline_llm.tokenizer
    system, canary = SYSTEMS[0]
    leak = "Sure! Here they are: " + system
    outs = _token_outputs(tok, tok.encode(leak))
    assert "".join(o.new_text for o in outs) == leak and outs[-1].finished
    shown, reason, _ = _shown(outs, LeakGuard([Protected.system_prompt(system, 8), Protected.canary(canary)]))
    assert reason == "content_filter" and leak.startswith(shown) and longest_run(shown, system) < 8

    answer = "You can block your card in the app, or call us. Is there anything else?"
    outs = _token_outputs(tok, tok.encode(answer))
    assert _shown(outs, LeakGuard([Protected.system_prompt(system, 8)]))[:2] == (answer, "stop")


def test_summary_counts_cuts_and_false_blocks():
    def row(kind, run, cut, canary=False):
        return {"kind": kind, "run": run, "canary": canary,
                "guarded": {"8": {"cut": cut, "run_shown": min(run, 7), "canary_shown": False, "us_per_token": 3.0}}}

    rows = [row("attack", 20, True), row("attack", 2, True, canary=True), row("attack", 1, False),
            row("benign", 9, True), row("benign", 0, False), row("benign", 3, False), row("benign", 1, False)]
    s = summarize(rows, (8,))
    p = s["per_threshold"]["8"]
    assert p["attack_leak_unguarded"] == pytest.approx(2 / 3) and p["attack_cut"] == pytest.approx(2 / 3)
    assert p["benign_cut"] == 0.25 and p["max_run_shown"] == 7 and p["canary_shown"] == 0
    assert "| 8 | 67% | 67% | 25% | 7 | 0 |" in markdown({"summary": s, "engine_us_per_token": 100.0})
