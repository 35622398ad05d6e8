"""Chat logprobs carry each token's true bytes (issue 23): a piece of an emoji decodes
to U+FFFD alone, but its `bytes` are its own, so a client concatenating `bytes` over the
tokens rebuilds the exact UTF-8 text."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bastion.engine.sampling_params import TokenLogprob
from bastion.server.logprobs import TokenTexts, chat_logprobs
from bastion.server.token_bytes import TokenBytes

TEXT = "Llamas 🦙 party 🎉🚀: déjà vu, 你好!"


def test_byte_level_tokens_give_their_true_bytes(tokenizer):
    ids = tokenizer.encode(TEXT)
    texts = TokenTexts(tokenizer)
    # each position's alternatives: the next tokens of the text (pieces of emoji among them)
    items = [TokenLogprob(t, -0.5, 1, top=[(t, -0.5), (ids[(i + 1) % len(ids)], -1.5)]) for i, t in enumerate(ids)]
    content = chat_logprobs(items, texts, top_n=2).content
    assert any(c.token == "\ufffd" for c in content)  # the split emoji are there
    assert b"".join(bytes(c.bytes) for c in content).decode("utf-8") == TEXT
    for i, c in enumerate(content):
        assert c.top_logprobs[0].bytes == c.bytes
        assert c.top_logprobs[1].bytes == texts.bytes(ids[(i + 1) % len(ids)])
    assert texts.bytes(tokenizer.convert_tokens_to_ids("<|im_end|>")) == list(b"<|im_end|>")


def test_sentencepiece_byte_fallback_and_plain_text():
    pieces = {0: "<0xF0>", 1: "<0x9F>", 2: "▁la", 3: "<s>"}

    class SP:
        backend_tokenizer = SimpleNamespace(decoder="Sequence(Replace, ByteFallback, Fuse, Strip)")
        added_tokens_decoder = {3: "<s>"}

        def convert_ids_to_tokens(self, i):
            return pieces[i]

        def decode(self, ids):
            return "<s>" if ids == [3] else "\ufffd"

    tb = TokenBytes(SP())
    assert [tb(i) for i in range(4)] == [[0xF0], [0x9F], list(b" la"), list(b"<s>")]

    class Plain:  # no vocabulary to read: the decoded text's bytes
        def decode(self, ids):
            return "é"

    assert TokenBytes(Plain())(7) == [0xC3, 0xA9]


@pytest.mark.slow
def test_chat_logprobs_over_http_rebuild_the_answer(real_server, tokenizer):
    r = real_server.openai().chat.completions.create(
        model=real_server.model, messages=[{"role": "user", "content": "Repeat exactly: 🦙🎉🚀 yes"}],
        max_tokens=24, temperature=0, logprobs=True, top_logprobs=2)
    choice = r.choices[0]
    tokens = choice.logprobs.content
    assert any(t.token == "\ufffd" for t in tokens)  # the emoji came back in pieces
    if tokens[-1].token in tokenizer.all_special_tokens:  # the end-of-turn token has no text
        tokens = tokens[:-1]
    rebuilt = b"".join(bytes(t.bytes) for t in tokens)
    text = choice.message.content.encode()
    # a reply cut by max_tokens may end inside a character, which the text holds back
    assert rebuilt == text if choice.finish_reason == "stop" else rebuilt.startswith(text)
    for t in choice.logprobs.content:
        assert t.top_logprobs and all(isinstance(b, int) for x in t.top_logprobs for b in x.bytes)
