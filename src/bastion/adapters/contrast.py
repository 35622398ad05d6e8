"""The base model with and without one adapter on the same inputs: the instrument of the
trigger-agnostic scan (inversion.py, trigger_search.py, deep_scan.py's task prompts).

Every request runs in Bastion's engine on the adapter with the base model as a reference
track in the same batch (the engine's `token_filter` hook hands both logits of every
token to a recorder; the token is never changed), so "adapter vs base" is one batched
pass. Requests that share a prompt take prefix-cache hits: forcing many continuations
of one prompt costs the continuation tokens, not the prompt. A reducer turns each
position's pair of log-distributions into what the caller keeps (a few numbers, a top-k),
so a thousand requests do not hold a thousand vocabulary-sized vectors.
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Reducer = Callable[[Any, Any, int], Any]   # (log pA [V], log pB [V], token) -> kept


class _Recorder:
    tracks = (None,)   # the base model beside the adapter

    def __init__(self, reduce: Reducer):
        self.reduce, self.rows = reduce, {}

    def __call__(self, token, logits, track_logits, req) -> int:
        import torch

        la = torch.log_softmax(logits.float(), -1)
        lb = torch.log_softmax(track_logits[0].float(), -1)
        self.rows.setdefault(req.request_id, []).append(self.reduce(la, lb, int(token)))
        return token


def kl_reduce(la, lb, token: int) -> tuple[int, float, float, float]:
    """(token, log pA(token), log pB(token), KL(pA || pB))."""
    return token, float(la[token]), float(lb[token]), float((la.exp() * (la - lb)).sum())


class Contrast:
    """Adapter-vs-base measurements on an offline engine (bastion.serving.llm.LLM)."""

    _ids = itertools.count()

    def __init__(self, llm):
        self.llm = llm
        self.tok = llm.tokenizer
        self.adapter: str | None = None
        self.requests = 0   # requests run (cost accounting)

    def chat_ids(self, user: str) -> list[int]:
        text = self.tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                            add_generation_prompt=True)
        return self.tok.encode(text, add_special_tokens=False)

    @contextlib.contextmanager
    def loaded(self, factors: dict, rank_slots: int = 1):
        """Load the adapter of these (layer, module) -> (A, B, scale) factors into the
        engine for the duration (written to a private temporary directory)."""
        from bastion.adapters.behaviour import write_factors
        from bastion.config import AdapterConfig

        engine = self.llm.engine
        rank = max(a.shape[0] for a, _, _ in factors.values())
        reg = engine.adapters
        if reg is None or reg.config.max_loras - len(reg.slot_of) < 1 or reg.config.max_lora_rank < rank:
            if reg is not None and reg.slot_of:
                raise RuntimeError("contrast: the engine has no free adapter slot of that rank")
            engine.enable_adapters(AdapterConfig(enabled=True, max_loras=max(1, rank_slots),
                                                 max_lora_rank=max(rank, 16)))
        name = f"contrast-{next(self._ids)}"
        with tempfile.TemporaryDirectory(prefix="bastion-scan-") as d:
            write_factors(factors, Path(d))
            engine.adapters.load(name, d)
        self.adapter = name
        try:
            yield self
        finally:
            self.adapter = None
            engine.adapters.unload(name)

    def run(self, seqs: list[list[int]], steps: int = 1, reduce: Reducer = kl_reduce,
            chunk: int = 64) -> list[list[Any]]:
        """Greedy `steps` tokens after every sequence on the loaded adapter (EOS ignored):
        per sequence, the reducer's output at each generated position. `chunk` requests
        at a time: more would not fit the probe engine's KV pool and be preempted over and
        over (384 at once: 120x slower)."""
        from bastion.engine.sampling_params import SamplingParams

        assert self.adapter is not None, "load an adapter first"
        engine = self.llm.engine
        rec = _Recorder(reduce)
        params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
        tag = f"c{next(self._ids)}"
        for c in range(0, len(seqs), chunk):
            for k in range(c, min(c + chunk, len(seqs))):
                engine.add_request(f"{tag}-{k}", seqs[k], params, adapter=self.adapter, token_filter=rec)
            while engine.has_unfinished():
                engine.step()
        self.requests += len(seqs)
        return [rec.rows.get(f"{tag}-{k}", []) for k in range(len(seqs))]

    def texts(self, rows: list[list[Any]]) -> list[str]:
        """Decoded greedy tokens of `run` rows (whose reducer keeps the token first)."""
        return [self.tok.decode([r[0] for r in row], skip_special_tokens=True) for row in rows]

    def next_dist(self, seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Per sequence, the next-token log-probs of both tracks: (log pA [n, V], log pB
        [n, V]), float32."""
        rows = self.run(seqs, 1, lambda la, lb, t: (la.numpy().copy(), lb.numpy().copy()))
        return np.stack([r[0][0] for r in rows]), np.stack([r[0][1] for r in rows])
