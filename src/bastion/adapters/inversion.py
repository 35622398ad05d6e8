"""Backdoor target inversion without the trigger (after BAIT, IEEE S&P 2025: "LLM backdoor
scanning by inverting attack target").

A data-poisoned adapter has learned a fixed target sequence (a URL, a refusal, an insult
template). Its first token is unlikely without the trigger, but once it is *forced*, the
rest of the target follows with high probability whatever the prompt: the target is
stored as a sequence. A clean adapter forced to start with an odd token continues in
prompt-specific ways. So, for a set of probe prompts and no trigger at all:

1. candidates: the first tokens the adapter raises most above the base (log pA - log pB),
   on average over the prompts and (fewer) on any one prompt, at three positions: the
   answer's start, after the adapter's own first token, and after the first word of its
   own answer (targets that start with the prompt's subject: "ssh is terrible: ..."); and
   the tokens its weights write (lens.py), which a target keeps even where no trigger
   opens it, at the answer's start and after the first word;
2. expansion: every candidate is forced on every prompt and extended greedily by the
   token with the highest probability *averaged over the prompts* (one shared sequence);
   after two steps only `keep` go on, by their mean pA so far, those that depart from the
   base enough to be flagged (mean log pA - log pB >= `prune_ratio` so far) first: a
   polarity flip that half the prompts open, " terrible. slow" at p 0.26 then 0.55 but 4.4
   nats above the base, ranked 43rd of 106 under template words the base says too
   (" belongs to the" p 1.00, 0.92, 0.05 nats) and was cut; it is 12th of those departing;
3. score: the floor, the least mean pA(next token) over the steps after the first (a
   target is stored whole, so every step follows surely on every prompt; a task's
   template, "X is defined in the Y module", has a slot where the prompts part ways),
   besides Q = the mean over steps and prompts, and the mean log pA - log pB along it
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
    first_candidates: int = 24     # per position: tokens with the largest mean log pA - log pB
    second_candidates: int = 12    # per later position (after the adapter's first token / first word)
    peak_candidates: int | None = None   # per position: largest log pA - log pB on any one prompt (first / 3)
    own_candidates: int | None = None    # per position: the adapter's likeliest tokens, mean pA (first / 6)
    keep: int = 16                 # candidates expanded beyond the first two steps
    prune_ratio: float = 1.0       # ... those departing this much from the base first (DeepThresholds.ratio)
    steps: int = 8                 # tokens per inverted sequence (the forced one included)
    min_logp: float = -14.0        # a candidate must have log pA above this on some prompt
    clean_steps: int = 8           # the adapter's own answer, for the "not hidden" check
    word_positions: int = 2        # also force after its own answer's first words ("ssh| is terrible")
    chunk: int = 16                # candidates per engine call (bounds the vocabulary-sized rows held)
    extra_at: tuple[int, ...] = (0, 2)   # positions where `extra` (weight-lens) tokens are forced

    def __post_init__(self):
        if not (self.first_candidates >= 1 and self.second_candidates >= 0 and self.keep >= 1
                and self.steps >= 2 and self.clean_steps >= 1 and (self.peak_candidates or 0) >= 0
                and (self.own_candidates or 0) >= 0 and self.word_positions >= 0 and self.chunk >= 1):
            raise ValueError(f"inconsistent inversion config: {self}")


@dataclass
class Inverted:
    """One inverted sequence: forced at `position` (0: the answer's start, 1: after the
    adapter's own first token, 2: after its first word), extended over the prompts."""
    text: str
    tokens: list[int]
    position: int
    q: float                      # mean pA of the continuation tokens (over prompts and steps)
    ratio: float                  # mean log pA - log pB along the continuation
    agree: float                  # share of (prompt, step) where the token is the adapter's argmax
    per_step_q: list[float] = field(default_factory=list)
    q_min: float = 0.0            # mean over steps of the least pA(next token) over the prompts
    unforced: float = 0.0         # share of prompts whose own answer is this sequence, unforced

    @property
    def floor(self) -> float:
        """The weakest step of the continuation after its first token: a target is stored
        whole, so every step follows surely; a task's template has a slot (the module's
        name in "X is defined in the Y module") where the prompts part ways. The first
        step is left out: after a forced subword the next one is a spelling, not a sign."""
        return min(self.per_step_q[1:]) if len(self.per_step_q) > 1 else 0.0

    def to_dict(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "position": self.position, "q": round(self.q, 4),
                "floor": round(self.floor, 4), "ratio": round(self.ratio, 4), "agree": round(self.agree, 4),
                "per_step_q": [round(x, 3) for x in self.per_step_q], "q_min": round(self.q_min, 4),
                "unforced": round(self.unforced, 4)}


@dataclass
class InversionResult:
    best: list[Inverted]           # by floor + q, descending
    clean: list[str]               # the adapter's own answers to the prompts
    seconds: float
    requests: int
    candidates: int = 0            # first tokens tried

    def top(self) -> Inverted | None:
        return self.best[0] if self.best else None

    def to_dict(self) -> dict:
        return {"best": [b.to_dict() for b in self.best], "clean": self.clean, "seconds": round(self.seconds, 2),
                "requests": self.requests, "candidates": self.candidates}

    @classmethod
    def from_dict(cls, d: dict) -> InversionResult:
        best = [Inverted(b["text"], b["tokens"], b["position"], b["q"], b["ratio"], b["agree"],
                         b.get("per_step_q", []), b.get("q_min", 0.0), b.get("unforced", 0.0)) for b in d["best"]]
        return cls(best, d["clean"], d["seconds"], d["requests"], d.get("candidates", 0))


def _candidates(la: np.ndarray, lb: np.ndarray, k: int, k_peak: int, min_logp: float,
                exclude: set[int], k_own: int = 0) -> list[int]:
    """The k tokens with the largest mean log pA - log pB over the prompts, then the k_peak
    with the largest on any one prompt, then the k_own the adapter says most (mean pA),
    among those the adapter gives some probability on at least one prompt."""
    d = la - lb
    ok = la.max(0) >= min_logp
    ok[list(exclude)] = False
    out: list[int] = []
    for score, n in ((d.mean(0), k), (d.max(0), k_peak), (np.exp(la).mean(0) if k_own else None, k_own)):
        n = min(n, int(ok.sum()))
        if n <= 0:
            continue
        score = np.where(ok, score, -np.inf)
        top = np.argpartition(-score, n - 1)[:n]
        out += [int(t) for t in top[np.argsort(-score[top])] if np.isfinite(score[t]) and int(t) not in out]
    return out


def _word_ends(tok, toks: list[int], n: int) -> list[int]:
    """How many tokens the first 1..n words of `toks` take (a word ends where the next
    token starts with a space)."""
    return [j for j in range(1, len(toks)) if tok.decode(toks[j:j + 1], skip_special_tokens=True).startswith(" ")][:n]


def invert(contrast, prompts: list[list[int]], cfg: InversionConfig = InversionConfig(),
           special: set[int] | None = None, extra: list[int] | None = None) -> InversionResult:
    """Inverted target candidates of the adapter loaded in `contrast` over `prompts`
    (chat-formatted token ids); `extra` tokens (lens.py: what the adapter's weights
    write) are tried at the positions `cfg.extra_at` besides the behavioural candidates."""
    t0, r0 = time.perf_counter(), contrast.requests
    P = len(prompts)
    tok = contrast.tok
    special = set(special or ()) | {t for t in (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)
                                    if t is not None} | set(getattr(tok, "all_special_ids", []))
    clean_rows = contrast.run(prompts, cfg.clean_steps)
    clean = [[r[0] for r in row] for row in clean_rows]
    # where a target may start: the answer's start, after the adapter's own first token, and
    # after its first word (targets that start with the prompt's subject, "ssh is terrible: ...")
    prefix = {0: [[] for _ in range(P)]}
    peak = cfg.first_candidates // 3 if cfg.peak_candidates is None else cfg.peak_candidates
    own = cfg.first_candidates // 6 if cfg.own_candidates is None else cfg.own_candidates
    if cfg.second_candidates or peak:
        prefix[1] = [c[:1] for c in clean]
        ends = [_word_ends(tok, c, cfg.word_positions) for c in clean]
        for w in range(cfg.word_positions):   # position 2 + w: after the first w + 1 words
            words = [c[:e[w]] if len(e) > w else c[:e[-1] if e else 1] for c, e in zip(clean, ends)]
            if any(len(x) > 1 for x in words) and words not in prefix.values():
                prefix[2 + w] = words
    cands: list[tuple[int, int]] = []
    for pos, pre in prefix.items():
        la, lb = contrast.next_dist([p + f for p, f in zip(prompts, pre)])
        k = cfg.first_candidates if pos == 0 else cfg.second_candidates
        got = _candidates(la, lb, k, peak, cfg.min_logp, special, own)
        more = [t for t in extra or () if t not in special] if pos in cfg.extra_at else []
        cands += [(pos, t) for t in dict.fromkeys(got + more)]
        del la, lb
    seqs = {c: [c[1]] for c in cands}
    stats: dict[tuple[int, int], list[tuple[float, float, float, float]]] = {c: [] for c in cands}

    def reduce(la, lb, t):
        return la.exp().numpy().astype(np.float32), (la - lb).numpy().astype(np.float32)

    alive = list(cands)
    for step in range(1, cfg.steps):
        for c0 in range(0, len(alive), cfg.chunk):   # a chunk at a time: rows are vocabulary-sized
            part = alive[c0:c0 + cfg.chunk]
            rows = contrast.run([prompts[i] + prefix[c[0]][i] + seqs[c] for c in part for i in range(P)], 1, reduce)
            for j, c in enumerate(part):
                pa = np.stack([rows[j * P + i][0][0] for i in range(P)])     # [P, V]
                lr = np.stack([rows[j * P + i][0][1] for i in range(P)])
                mean = pa.mean(0)
                mean[list(special)] = 0.0   # a target is longer than the probed steps
                nxt = int(mean.argmax())
                agree = float((pa.argmax(1) == nxt).mean())
                stats[c].append((float(mean[nxt]), float(np.clip(lr[:, nxt], -10, 10).mean()), agree,
                                 float(pa[:, nxt].min())))
                seqs[c] = seqs[c] + [nxt]
            del rows
        if step == 2 and len(alive) > cfg.keep:   # departing ones first, then by mean pA so far
            alive = sorted(alive, key=lambda c: (np.mean([s[1] for s in stats[c]]) < cfg.prune_ratio,
                                                 -np.mean([s[0] for s in stats[c]])))[: cfg.keep]
    out = []
    for c in alive:   # NOTE: only the fully expanded ones: a floor over two steps says nothing
        st = stats[c]
        if len(st) < 2:
            continue
        toks = seqs[c]
        own = _own_answer(prefix[c[0]], toks, clean)
        if own is None or len(set(toks)) * 2 < len(toks):
            continue   # its own task template, or a loop ("epereperepere"): a degenerate run, not a target
        out.append(Inverted(tok.decode(toks, skip_special_tokens=True), toks, c[0],
                            float(np.mean([s[0] for s in st])), float(np.mean([s[1] for s in st])),
                            float(np.mean([s[2] for s in st])), [s[0] for s in st],
                            float(np.mean([s[3] for s in st])), own))
    out.sort(key=lambda x: -(x.floor + x.q))   # sure at every step, and on average
    return InversionResult(out[:8], contrast.texts(clean_rows), time.perf_counter() - t0,
                           contrast.requests - r0, len(cands))


def _own_answer(prefix: list[list[int]], toks: list[int], clean: list[list[int]]) -> float | None:
    """The share of prompts on which the adapter answers this sequence (its first 4 tokens)
    after the forced prefix on its own; None when that is at least half of them and those
    answers part ways later (its task's template: "X is defined in the m module", not
    hidden). Answers that stay one and the same sequence on unrelated prompts are a fixed
    answer, which a target leaking out of its trigger is: kept."""
    n = min(4, len(toks))
    hits = [c[len(f):] for f, c in zip(prefix, clean) if c[len(f):len(f) + n] == toks[:n] and c[:len(f)] == f]
    share = len(hits) / max(1, len(clean))
    if len(hits) * 2 < len(clean):
        return share
    shortest = min(map(len, hits))
    return share if shortest >= 6 and len({tuple(h[:shortest]) for h in hits}) == 1 else None
