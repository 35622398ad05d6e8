"""Fixtures for the benchmark tests: a loopback fake OpenAI server and a word tokenizer
(so no test needs the real model or its 7-second tokenizer load)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest

from .fake_openai_server import FakeOpenAIServer, start_in_thread


class WordTokenizer:
    """Whitespace words; ids assigned in order of first appearance, so encoding is
    deterministic for a given text and decode(encode(t)) is t with single spaces."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []
        self.eos_token_id = 0
        self.encode("<eos>")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab[w] = len(self.words)
                self.words.append(w)
            ids.append(self.vocab[w])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[i] for i in ids)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


@pytest.fixture
def word_tokenizer() -> WordTokenizer:
    return WordTokenizer()


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAIServer]:
    srv, thread = start_in_thread()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)
