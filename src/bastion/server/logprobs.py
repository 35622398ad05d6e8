"""Engine TokenLogprobs -> the three JSON shapes clients expect.

* chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``
* completions (OpenAI legacy): parallel lists ``tokens / token_logprobs /
  top_logprobs / text_offset``; with ``echo`` the prompt tokens come first and the
  first prompt token has ``null`` (nothing precedes it). Summing token_logprobs over
  the prompt gives its log-likelihood, which is how perplexity is measured via the API.
* prompt_logprobs (vLLM): per prompt position ``{token_id: {logprob, rank, decoded_token}}``.

Token strings are the single-token decode, as OpenAI shows them (U+FFFD for a piece of
a multi-byte character); chat's `bytes` are the token's raw bytes (token_bytes.py), so
concatenated over a response they are its exact UTF-8.
"""

from __future__ import annotations

import math
from typing import Any

from bastion.engine.sampling_params import TokenLogprob
from bastion.server.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprobEntry,
    PromptLogprobs,
    TopLogprob,
)
from bastion.server.token_bytes import TokenBytes

# JSON has no -Infinity; a masked-out token's logprob is reported as this instead.
_FLOOR = -9999.0


def _finite(x: float) -> float:
    return x if math.isfinite(x) else _FLOOR


class TokenTexts:
    """Single-token decodes, cached per response (top-n lists repeat tokens a lot)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._cache: dict[int, str] = {}
        # Special tokens (BOS, ...) have a token string but no text in an echoed
        # prompt; text offsets count them as zero-width.
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
        self.bytes = TokenBytes(tokenizer)  # token id -> its raw bytes (not its decode's)

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            s = self._tok.decode([token_id])
            self._cache[token_id] = s
        return s


def chat_logprobs(items: list[TokenLogprob], texts: TokenTexts, top_n: int) -> ChatLogprobs:
    content = []
    for lp in items:
        tok = texts(lp.token_id)
        top = [TopLogprob(token=texts(t), logprob=_finite(v), bytes=texts.bytes(t)) for t, v in lp.top[:top_n]]
        content.append(ChatTokenLogprob(token=tok, logprob=_finite(lp.logprob), bytes=texts.bytes(lp.token_id),
                                        top_logprobs=top))
    return ChatLogprobs(content=content)


class CompletionLogprobBuilder:
    """Builds the legacy completions logprobs, keeping text offsets running across
    streamed chunks (each chunk gets its own lists, offsets stay absolute)."""

    def __init__(self, texts: TokenTexts, top_n: int, start_offset: int = 0) -> None:
        self._texts = texts
        self._top_n = top_n
        self.offset = start_offset

    def _top(self, lp: TokenLogprob) -> dict[str, float]:
        top = {self._texts(t): _finite(v) for t, v in lp.top[: self._top_n]}
        # OpenAI always lists the sampled token among the alternatives.
        top.setdefault(self._texts(lp.token_id), _finite(lp.logprob))
        return top

    def build(self, entries: list[tuple[int, TokenLogprob | None]]) -> CompletionLogprobs:
        """`entries`: (token id, its logprob or None where there is none)."""
        out = CompletionLogprobs()
        for token_id, lp in entries:
            tok = self._texts(token_id)
            out.tokens.append(tok)
            out.token_logprobs.append(None if lp is None else _finite(lp.logprob))
            out.top_logprobs.append(None if lp is None else self._top(lp))
            out.text_offset.append(self.offset)
            if token_id not in self._texts.special_ids:
                self.offset += len(tok)
        return out


def concat(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs,
                              text_offset=a.text_offset + b.text_offset)


def prompt_entries(prompt_ids: list[int], prompt_lps: list[TokenLogprob | None] | None
                   ) -> list[tuple[int, TokenLogprob | None]]:
    lps = list(prompt_lps or [])
    lps += [None] * (len(prompt_ids) - len(lps))
    return list(zip(prompt_ids, lps))


def vllm_prompt_logprobs(prompt_ids: list[int], prompt_lps: list[TokenLogprob | None] | None,
                         texts: TokenTexts) -> PromptLogprobs:
    result: PromptLogprobs = []
    for token_id, lp in prompt_entries(prompt_ids, prompt_lps):
        if lp is None:
            result.append(None)
            continue
        entry = {str(token_id): PromptLogprobEntry(logprob=_finite(lp.logprob), rank=lp.rank,
                                                   decoded_token=texts(token_id))}
        for rank, (t, v) in enumerate(lp.top, start=1):
            entry.setdefault(str(t), PromptLogprobEntry(logprob=_finite(v), rank=rank, decoded_token=texts(t)))
        result.append(entry)
    return result
