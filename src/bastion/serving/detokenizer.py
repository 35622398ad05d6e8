"""Incremental detokenization and stop strings, for streaming.

Decoding only a short window of recent tokens keeps the cost per token constant, and
text is only emitted once it is complete UTF-8 (no "\ufffd" halves of a character).
While a request runs, text that could still turn into a stop string is held back, so
a stream never shows part of a stop string.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = (), include_stop: bool = False):
        self.tok = tokenizer
        self.stop, self.include_stop = stop, include_stop
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""  # all output text decoded so far
        self.emitted = 0  # chars of self.text already handed out
        self.holdback = max((len(s) for s in stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, new_ids: list[int], finished: bool) -> tuple[str, bool]:
        """Feed new token ids; returns (text delta to emit, hit_stop_string)."""
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            start = len(self.text)
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            if self.stop and self._truncate_at_stop(start):
                return self._flush(), True
        elif finished and full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
        if finished:
            return self._flush(), False
        safe = len(self.text) - self.holdback
        if safe <= self.emitted:
            return "", False
        delta, self.emitted = self.text[self.emitted : safe], safe
        return delta, False

    def _truncate_at_stop(self, new_start: int) -> bool:
        # search only where a new match can start: just before the new text onwards
        lo = max(0, new_start - self.holdback)
        best = None
        for s in self.stop:
            i = self.text.find(s, lo)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
        return True

    def _flush(self) -> str:
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta
