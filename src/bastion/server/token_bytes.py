"""A token's raw bytes, for the `bytes` field of chat logprobs (OpenAI's format).

Decoding one token alone gives U+FFFD for a piece of a multi-byte character (an emoji
is often 2-4 byte-level tokens), and U+FFFD's own bytes say nothing about the text. The
true bytes come from the tokenizer's vocabulary instead, so concatenating `bytes` over
a response's tokens rebuilds its exact UTF-8:

* byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen2): each vocabulary character stands for
  one byte (GPT-2's bytes_to_unicode table), inverted here;
* SentencePiece with byte fallback (Llama 2, Mistral): `<0xNN>` tokens are byte NN and
  `▁` is a space;
* special and added tokens, or any other tokenizer: the decoded text's UTF-8.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: vocabulary character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


def _decoder_kind(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = repr(getattr(backend, "decoder", None))
    if "ByteLevel" in decoder:
        return "byte_level"
    if "ByteFallback" in decoder:
        return "byte_fallback"
    return "text"


class TokenBytes:
    """token id -> its raw bytes (list of ints), cached."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._kind = _decoder_kind(tokenizer)
        self._added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self._cache: dict[int, list[int]] = {}

    def __call__(self, token_id: int) -> list[int]:
        b = self._cache.get(token_id)
        if b is None:
            b = self._cache[token_id] = list(self._bytes(token_id))
        return b

    def _bytes(self, token_id: int) -> bytes:
        if self._kind != "text" and token_id not in self._added:
            piece = self._tok.convert_ids_to_tokens(token_id)
            if isinstance(piece, str):
                if self._kind == "byte_level":
                    table = byte_decoder()
                    if all(c in table for c in piece):
                        return bytes(table[c] for c in piece)
                else:
                    m = _BYTE_TOKEN.match(piece)
                    if m:
                        return bytes([int(m.group(1), 16)])
                    return piece.replace("▁", " ").encode("utf-8")
        return self._tok.decode([token_id]).encode("utf-8")
