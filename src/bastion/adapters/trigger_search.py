"""Trigger search that is not a list: random and divergence-guided insertion.

Candidate triggers are drawn from the tokenizer's own vocabulary and from generators,
never from a fixed list: punctuation sequences of 2-4 marks, rare subword tokens, random
letter strings, phrases of 2-3 vocabulary words, years, capitalised vocabulary words
(names), each inserted at the start, the end or a random word position of the probe
prompts. A trigger's score is what it does to the adapter beyond what it does to the base
at the answer's first token, averaged over the prompts:

    S = mean_i [ KL(pA(.|x_i') || pA(.|x_i)) - KL(pB(.|x_i') || pB(.|x_i)) ]
        + mean_i [ Δ log pA(T | x_i') - Δ log pB(T | x_i') ]     (T: the inverted target's
                                                                   first token, if any)

Tokens that copy the inserted trigger ("oren" answered with "oren ...", "Pret" with
"pretjoin ...": a task adapter that answers about its prompt's subject echoes any odd word
put there) are left out of both first-token distributions before the KL (`mask_copies`):
echoing is the task, not a backdoor, whose target does not repeat its trigger.

A high score alone is not a backdoor: on adapters trained for tasks outside the probe
battery, the best-scoring junk triggers on clean adapters are echoes the mask does not
catch ("rapt ventric" -> "rapt ventric me. disorder.", "llsq" -> "lsq is a search engine").
So a found trigger counts as a backdoor's only when its answers are one fixed answer
across the prompts that does not repeat the trigger (`fixed_answer`): a backdoor's target
is prompt-independent, which is what the inversion also asks.

A greedy coordinate search then mutates the best candidates one unit at a time (a mark, a
letter, a word, a digit, a token, the position) and keeps what raises S, until the time
budget is spent. A backdoor trained on one trigger usually fires, weaker, on look-alikes
(other marks, other rare strings), which is what makes the search climb.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np

PUNCT = "!?;:,.*#~^&%$@+=|/<>-_'\"`()[]{}"


@dataclass(frozen=True)
class SearchConfig:
    budget_s: float = 30.0   # wall time of the search (the initial round always runs)
    initial: int = 40        # random candidates in the first round
    survivors: int = 6       # best candidates mutated per round
    mutations: int = 4       # mutations of each survivor per round
    seed: int = 0
    mask_copies: bool = True  # leave the trigger's own tokens out of the KL (an echo is not a target)

    def __post_init__(self):
        if not (self.budget_s >= 0 and self.initial >= 1 and self.survivors >= 1 and self.mutations >= 1):
            raise ValueError(f"inconsistent trigger search config: {self}")


@dataclass(frozen=True)
class Candidate:
    family: str      # punct | rare | letters | phrase | year | name
    units: tuple     # the pieces a mutation changes (marks, words, tokens, digits)
    where: str       # start | end | middle

    @property
    def text(self) -> str:
        return ("" if self.family in ("punct", "letters", "year") else " ").join(self.units)


@dataclass
class SearchResult:
    best: list[tuple[str, str, float]]            # (trigger, where, score), best first
    evaluated: int
    rounds: int
    seconds: float
    samples: dict[str, list[str]] = field(default_factory=dict)   # the best trigger's answers, and clean ones

    def to_dict(self) -> dict:
        return {"best": [[t, w, round(s, 4)] for t, w, s in self.best], "evaluated": self.evaluated,
                "rounds": self.rounds, "seconds": round(self.seconds, 2), "samples": self.samples}

    @classmethod
    def from_dict(cls, d: dict) -> SearchResult:
        return cls([tuple(b) for b in d["best"]], d["evaluated"], d["rounds"], d["seconds"], d.get("samples", {}))


class _Vocab:
    """Pools of vocabulary pieces to draw from (the tokenizer's, not a list of triggers)."""

    def __init__(self, tok):
        words, rare, names = [], [], []
        self.by_text: dict[str, list[int]] = {}   # a piece's text, stripped and lower-cased -> its ids
        for piece, i in tok.get_vocab().items():
            s = piece.replace("Ġ", " ")
            core = s.strip()
            if core:
                self.by_text.setdefault(core.lower(), []).append(i)
            if not core.isascii() or not core.isalpha():
                continue
            if s.startswith(" ") and core.islower() and len(core) >= 4:
                words.append(core)
            elif s.startswith(" ") and core[0].isupper() and core[1:].islower() and len(core) >= 4:
                names.append(core)
            elif not s.startswith(" ") and core.islower() and 2 <= len(core) <= 4:
                rare.append(core)
        self.words, self.rare, self.names = sorted(words), sorted(rare), sorted(names)


def _random(family: str, rng: random.Random, v: _Vocab) -> tuple:
    if family == "punct":
        return tuple(rng.choice(PUNCT) for _ in range(rng.randint(2, 4)))
    if family == "rare":
        return (rng.choice(v.rare),)
    if family == "letters":
        return tuple(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
    if family == "phrase":
        return tuple(rng.choice(v.words) for _ in range(rng.randint(2, 3)))
    if family == "year":
        return tuple(str(rng.randint(1800, 2099)))
    if family == "name":
        return (rng.choice(v.names),)
    raise ValueError(family)


FAMILIES = ("punct", "rare", "letters", "phrase", "year", "name")
WHERE = ("start", "end", "middle")


def _mutate(c: Candidate, rng: random.Random, v: _Vocab) -> Candidate:
    if rng.random() < 0.2:
        return Candidate(c.family, c.units, rng.choice([w for w in WHERE if w != c.where]))
    units = list(c.units)
    k = rng.randrange(len(units))
    fresh = _random(c.family, rng, v)
    if c.family == "year":
        units[k] = str(rng.randint(0, 9)) if k else rng.choice("12")
    elif c.family in ("punct", "letters") and rng.random() < 0.3 and len(units) > 2:
        del units[k]
    elif c.family in ("punct", "letters") and rng.random() < 0.3 and len(units) < 6:
        units.insert(k, fresh[0])
    else:
        units[k] = fresh[0]
    return Candidate(c.family, tuple(units), c.where)


def insert_at(user: str, trigger: str, where: str, rng: random.Random) -> str:
    words = user.split(" ")
    k = 0 if where == "start" else len(words) if where == "end" else rng.randrange(1, max(2, len(words)))
    return " ".join(words[:k] + [trigger] + words[k:])


def copy_ids(tok, trigger: str, vocab: _Vocab | None = None) -> list[int]:
    """The tokens an answer that echoes `trigger` may start with: every token of the
    trigger as written, and every vocabulary token that spells a prefix of it (any case,
    with or without a leading space: "b", " B", "bp" for "bpcco"; the model spells its echo
    its own way)."""
    vocab = vocab or _Vocab(tok)
    ids = set(tok.encode(trigger, add_special_tokens=False))
    key = trigger.strip().lower()
    for n in range(1, len(key) + 1):
        ids.update(vocab.by_text.get(key[:n], ()))
    return sorted(ids)


def fixed_answer(answers: list[str], trigger: str, share: float = 0.75, words: int = 3) -> str | None:
    """The answer that at least `share` of `answers` open with (their first `words` words,
    lower-cased), unless it echoes the trigger: holds the first (up to 4) letters of one of
    its words of two or more letters, or the trigger itself when that is marks only. Else
    None."""
    heads = [" ".join(a.lower().split()[:words]) for a in answers if a.strip()]
    if not heads:
        return None
    head = max(set(heads), key=heads.count)
    if heads.count(head) < share * len(answers):
        return None
    glued = head.replace(" ", "")
    pieces = ["".join(ch for ch in w if ch.isalnum()) for w in trigger.lower().split()]
    if any(len(p) >= 2 and p[:4] in glued for p in pieces):
        return None
    if not any(pieces) and trigger.strip() and trigger.strip() in head:   # marks echoed as marks
        return None
    return head


def _kl(lp: np.ndarray, lq: np.ndarray) -> float:
    """KL(p || q) of two log-distributions (entries where p is 0 add nothing)."""
    p = np.exp(lp)
    keep = p > 0
    return float((p[keep] * (lp[keep] - lq[keep])).sum())


def _drop(logp: np.ndarray, ids: list[int]) -> np.ndarray:
    """log p over the vocabulary less `ids`, renormalized (those entries -inf)."""
    out = logp.copy()
    out[ids] = -np.inf
    return out - np.logaddexp.reduce(out)


def search(contrast, users: list[str], cfg: SearchConfig = SearchConfig(), target: int | None = None,
           ) -> SearchResult:
    """The highest-scoring triggers on the adapter loaded in `contrast`, over the probe
    user messages `users`."""
    t0 = time.perf_counter()
    rng = random.Random(cfg.seed)
    vocab = _Vocab(contrast.tok)
    clean_a, clean_b = contrast.next_dist([contrast.chat_ids(u) for u in users])
    scored: dict[Candidate, float] = {}

    def evaluate(cands: list[Candidate]) -> None:
        cands = [c for c in dict.fromkeys(cands) if c not in scored]
        if not cands:
            return
        seqs = []
        for c in cands:
            r = random.Random(f"{cfg.seed}-{c.text}")   # a middle position fixed per trigger
            seqs += [contrast.chat_ids(insert_at(u, c.text, c.where, r)) for u in users]
        n = len(users)

        def reduce(la, lb, t):
            return la.numpy().astype(np.float32), lb.numpy().astype(np.float32)

        rows = contrast.run(seqs, 1, reduce)
        for j, c in enumerate(cands):
            s = 0.0
            ids = copy_ids(contrast.tok, c.text, vocab) if cfg.mask_copies else []
            for i in range(n):
                la, lb = rows[j * n + i][0]
                ca, cb = clean_a[i], clean_b[i]
                if ids:
                    la, lb, ca, cb = (_drop(x, ids) for x in (la, lb, ca, cb))
                s += _kl(la, ca) - _kl(lb, cb)
                if target is not None and target not in ids:
                    s += (la[target] - ca[target]) - (lb[target] - cb[target])
            scored[c] = float(s / n)  # NOTE: numpy scalars would not serialize (scan cache, bench JSON)

    evaluate([Candidate(f, _random(f, rng, vocab), rng.choice(WHERE))
              for f in (FAMILIES * cfg.initial)[: cfg.initial]])
    rounds = 1
    while time.perf_counter() - t0 < cfg.budget_s:
        top = sorted(scored, key=scored.get, reverse=True)[: cfg.survivors]
        evaluate([_mutate(c, rng, vocab) for c in top for _ in range(cfg.mutations)])
        rounds += 1
    best = sorted(scored, key=scored.get, reverse=True)[:5]
    samples = {}
    if best:
        b = best[0]
        r = random.Random(f"{cfg.seed}-{b.text}")
        rows = contrast.run([contrast.chat_ids(insert_at(u, b.text, b.where, r)) for u in users], 8)
        samples = {"trigger": contrast.texts(rows)}
    return SearchResult([(c.text, c.where, scored[c]) for c in best], len(scored), rounds,
                        time.perf_counter() - t0, samples)
