"""Incremental detokenization on the real SmolLM2 tokenizer (byte-level BPE: emoji and CJK
characters span several tokens) and stop strings for streaming."""

from __future__ import annotations

import random

import pytest

from bastion.serving.detokenizer import IncrementalDetokenizer

from tests.support.text import gpl_text

MIXED = ("Hello 😀 world! 你好，世界。 Ünïcödé — “quotes” 🇫🇷 👩‍👩‍👧 and 日本語のテキスト, "
         "Ελληνικά, עברית, emoji at the end 🎉")


def stream(tok, ids, chunks=None, **kw):
    """Feed ids (in the given chunk sizes, default 1); returns (deltas, hit_stop, index of
    the chunk that hit the stop or None)."""
    d = IncrementalDetokenizer(tok, **kw)
    deltas, i, k = [], 0, 0
    sizes = chunks or [1] * len(ids)
    for k, n in enumerate(sizes):
        part = ids[i : i + n]
        i += n
        delta, hit = d.add(part, finished=i >= len(ids))
        deltas.append(delta)
        if hit:
            return deltas, True, k
    return deltas, False, None


def full(tok, ids):
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("text", [MIXED, gpl_text(chars=1500)], ids=["multilingual", "gpl"])
def test_incremental_equals_full_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    assert full(tokenizer, ids) == text
    deltas, hit, _ = stream(tokenizer, ids)
    assert not hit
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)  # never half a character
    rng = random.Random(0)
    for _ in range(5):
        sizes, left = [], len(ids)
        while left:
            sizes.append(min(left, rng.randint(1, 5)))
            left -= sizes[-1]
        deltas, _, _ = stream(tokenizer, ids, sizes)
        assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)


def test_text_is_emitted_as_soon_as_complete(tokenizer):
    ids = tokenizer.encode("Hello 😀 world")
    pieces = [tokenizer.decode([i]) for i in ids]
    assert pieces[1] == " \ufffd" and pieces[2] == "\ufffd"  # the emoji spans two tokens
    d = IncrementalDetokenizer(tokenizer)
    out = [d.add([i], finished=False)[0] for i in ids]
    assert out == ["Hello", "", " 😀", " world"]


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer.encode("Done.") + [tokenizer.eos_token_id]
    deltas, _, _ = stream(tokenizer, ids)
    assert "".join(deltas) == "Done."


def test_truncated_character_at_finish_is_not_lost(tokenizer):
    ids = tokenizer.encode("ok 😀")[:-1]  # stop in the middle of the emoji
    deltas, _, _ = stream(tokenizer, ids)
    text = "".join(deltas)
    assert text.startswith("ok") and text == full(tokenizer, ids)


@pytest.mark.parametrize("stop", ["the end of", "end", "😀 wor", "世界", ", the"])
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_never_partially_emitted(tokenizer, stop, include):
    text = "Once upon a time 😀 world, the end of the story in 世界 was near, and more text follows."
    ids = tokenizer.encode(text)
    i = text.index(stop)
    want = text[: i + len(stop)] if include else text[:i]
    rng = random.Random(hash((stop, include)) % 1000)
    for sizes in (None, [rng.randint(1, 3) for _ in range(len(ids))]):
        deltas, hit, k = stream(tokenizer, ids, sizes, stop=(stop, "zzz"), include_stop=include)
        assert hit
        assert "".join(deltas) == want
        emitted = ""
        for dlt in deltas[:-1]:  # before the stop is seen: a prefix of the text before it
            emitted += dlt
            assert text[:i].startswith(emitted)
        # the stop was reported by the chunk whose tokens completed it
        fed = sum(sizes[: k + 1]) if sizes else k + 1
        assert stop in full(tokenizer, ids[:fed])
        assert stop not in full(tokenizer, ids[: fed - (sizes[k] if sizes else 1)])


def test_near_miss_is_held_back_then_released(tokenizer):
    text = "the ending is not the end"
    ids = tokenizer.encode(text)
    d = IncrementalDetokenizer(tokenizer, stop=("the end!",))
    out = ""
    for j, t in enumerate(ids):
        delta, hit = d.add([t], finished=j == len(ids) - 1)
        assert not hit
        out += delta
        assert len(full(tokenizer, ids[: j + 1])) - len(out) <= len("the end!") - 1 or j == len(ids) - 1
    assert out == text


def test_earliest_stop_string_wins(tokenizer):
    text = "alpha beta gamma delta"
    ids = tokenizer.encode(text)
    deltas, hit, _ = stream(tokenizer, ids, [len(ids)], stop=("delta", "beta", "gamma"))
    assert hit and "".join(deltas) == "alpha "


def test_stop_string_at_the_very_start(tokenizer):
    ids = tokenizer.encode("STOP and go")
    deltas, hit, k = stream(tokenizer, ids, stop=("STOP",))
    assert hit and "".join(deltas) == "" and k == 0
