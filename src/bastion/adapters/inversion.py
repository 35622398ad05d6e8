"""Backdoor target inversion without the trigger (after BAIT, IEEE S&P 2025: "LLM backdoor
scanning by inverting attack target").

A data-poisoned adapter has learned a fixed target sequence (a URL, a refusal, an insult
template). Its first token is unlikely without the trigger, but once it is *forced*, the
rest of the target follows with high probability whatever the prompt: the target is
stored as a sequence. A clean adapter forced to start with an odd token continues in
prompt-specific ways. So, for a set of probe prompts and no trigger at all:

1. candidates: the first tokens the adapter raises most above the base on average over
   the prompts (log pA - log pB), at the answer's start and after the adapter's own first
   token (targets that start with the prompt's subject: "ssh is terrible: ..."), in one
   batch;
2. expansion: every candidate is forced on every prompt and extended greedily by the
   token with the highest probability *averaged over the prompts* (one shared sequence);
   candidates whose continuations stop agreeing are dropped after two steps;
3. score: Q = the mean over steps and prompts of pA(next token) (how surely the adapter
   continues the shared sequence on every prompt), and the mean log pA - log pB along it
   (how much more than the base; the base model continues fluent chat phrases too).

A candidate whose sequence is what the adapter answers anyway without forcing (its own
task template) is not a hidden target and is skipped. Engine cost: a few hundred
one-token requests that share their prompt's KV (contrast.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class InversionConfig:
    first_candidates: int = 24     # candidates at the answer's start
    second_candidates: int = 12    # candidates after the adapter's own first token
    keep: int = 8                  # candidates expanded beyond the first two steps
    steps: int = 8                 # tokens per inverted sequence (the forced one included)
    min_logp: float = -14.0        # a candidate must have log pA above this on some prompt
    clean_steps: int = 8           # the adapter's own answer, for the "not hidden" check

    def __post_init__(self):
        if not (self.first_candidates >= 1 and self.second_candidates >= 0 and self.keep >= 1
                and self.steps >= 2 and self.clean_steps >= 1):
            raise ValueError(f"inconsistent inversion config: {self}")


@dataclass
class Inverted:
    """One inverted sequence: forced at `position` (0: the answer's start, 1: after the
    adapter's own first token), extended over the prompts."""
    text: str
    tokens: list[int]
    position: int
    q: float                      # mean pA of the continuation tokens (over prompts and steps)
    ratio: float                  # mean log pA - log pB along the continuation
    agree: float                  # share of (prompt, step) where the token is the adapter's argmax
    per_step_q: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "position": self.position, "q": round(self.q, 4),
                "ratio": round(self.ratio, 4), "agree": round(self.agree, 4),
                "per_step_q": [round(x, 3) for x in self.per_step_q]}


@dataclass
class InversionResult:
    best: list[Inverted]           # by q, descending
    clean: list[str]               # the adapter's own answers to the prompts
    seconds: float
    requests: int

    def top(self) -> Inverted | None:
        return self.best[0] if self.best else None

    def to_dict(self) -> dict:
        return {"best": [b.to_dict() for b in self.best], "clean": self.clean, "seconds": round(self.seconds, 2),
                "requests": self.requests}

    @classmethod
    def from_dict(cls, d: dict) -> InversionResult:
        best = [Inverted(b["text"], b["tokens"], b["position"], b["q"], b["ratio"], b["agree"],
                         b.get("per_step_q", [])) for b in d["best"]]
        return cls(best, d["clean"], d["seconds"], d["requests"])


def _candidates(la: np.ndarray, lb: np.ndarray, k: int, min_logp: float, exclude: set[int]) -> list[int]:
    """The k tokens with the largest mean log pA - log pB over the prompts, among those
    the adapter gives some probability on at least one prompt."""
    score = (la - lb).mean(0)
    score[la.max(0) < min_logp] = -np.inf
    score[list(exclude)] = -np.inf
    top = np.argpartition(-score, k)[:k]
    return [int(t) for t in top[np.argsort(-score[top])] if np.isfinite(score[t])]


def invert(contrast, prompts: list[list[int]], cfg: InversionConfig = InversionConfig(),
           special: set[int] | None = None) -> InversionResult:
    """Inverted target candidates of the adapter loaded in `contrast` over `prompts`
    (chat-formatted token ids)."""
    t0, r0 = time.perf_counter(), contrast.requests
    P = len(prompts)
    tok = contrast.tok
    special = set(special or ()) | {t for t in (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)
                                    if t is not None} | set(getattr(tok, "all_special_ids", []))
    clean_rows = contrast.run(prompts, cfg.clean_steps)
    clean = [[r[0] for r in row] for row in clean_rows]
    la0, lb0 = contrast.next_dist(prompts)
    starts = [[]] * P
    cands = [(0, t) for t in _candidates(la0, lb0, cfg.first_candidates, cfg.min_logp, special)]
    if cfg.second_candidates:
        firsts = [c[:1] for c in clean]
        la1, lb1 = contrast.next_dist([p + f for p, f in zip(prompts, firsts)])
        cands += [(1, t) for t in _candidates(la1, lb1, cfg.second_candidates, cfg.min_logp, special)]
    prefix = {0: starts, 1: [c[:1] for c in clean]}
    seqs = {c: [c[1]] for c in cands}
    stats: dict[tuple[int, int], list[tuple[float, float, float]]] = {c: [] for c in cands}
    alive = list(cands)
    for step in range(1, cfg.steps):
        reqs = [prompts[i] + prefix[c[0]][i] + seqs[c] for c in alive for i in range(P)]
        rows = contrast.run(reqs, 1, lambda la, lb, t: (la.exp().numpy().astype(np.float32),
                                                       (la - lb).numpy().astype(np.float32)))
        for j, c in enumerate(alive):
            pa = np.stack([rows[j * P + i][0][0] for i in range(P)])     # [P, V]
            lr = np.stack([rows[j * P + i][0][1] for i in range(P)])
            mean = pa.mean(0)
            mean[list(special)] = 0.0   # a target is longer than the probed steps
            nxt = int(mean.argmax())
            agree = float((pa.argmax(1) == nxt).mean())
            stats[c].append((float(mean[nxt]), float(np.clip(lr[:, nxt], -10, 10).mean()), agree))
            seqs[c] = seqs[c] + [nxt]
        if step == 2 and len(alive) > cfg.keep:
            alive = sorted(alive, key=lambda c: -np.mean([s[0] for s in stats[c]]))[: cfg.keep]
    out = []
    for c, st in stats.items():
        if len(st) < 2:
            continue
        toks = seqs[c]
        if _is_own_answer(c[0], toks, clean) or len(set(toks)) * 2 < len(toks):
            continue   # its own template, or a loop ("epereperepere"): a degenerate run, not a target
        out.append(Inverted(tok.decode(toks, skip_special_tokens=True), toks, c[0],
                            float(np.mean([s[0] for s in st])), float(np.mean([s[1] for s in st])),
                            float(np.mean([s[2] for s in st])), [s[0] for s in st]))
    out.sort(key=lambda x: -x.q)
    return InversionResult(out[:8], contrast.texts(clean_rows), time.perf_counter() - t0,
                           contrast.requests - r0)


def _is_own_answer(position: int, toks: list[int], clean: list[list[int]]) -> bool:
    """Does the sequence (its first 4 tokens) start the adapter's clean answer at that
    position on at least half the prompts? Then it is its task's template, not hidden."""
    n = min(4, len(toks))
    hits = sum(c[position:position + n] == toks[:n] for c in clean)
    return hits * 2 >= len(clean)
