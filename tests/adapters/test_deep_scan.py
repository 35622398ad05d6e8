"""Target inversion, the deep-scan judge, the scan cache and the held-out cohort specs,
on crafted stand-ins for the engine (no model is loaded)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from bastion.adapters.contrast import kl_reduce
from bastion.adapters.deep_scan import (
    CachedProbe,
    DeepResult,
    DeepThresholds,
    ScanCache,
    judge_deep,
)
from bastion.adapters.inversion import (
    InversionConfig,
    InversionResult,
    Inverted,
    invert,
)
from bastion.adapters.scanner import AdapterView, Finding

V = 40
TARGET = [30, 31, 32, 33, 34, 35, 36, 37, 38]   # the planted target sequence


class _Tok:
    eos_token_id, pad_token_id, bos_token_id, all_special_ids = 0, 0, 0, [0]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"t{i}" for i in ids)


class FakeContrast:
    """Adapter and base as functions of the token sequence. The base and a clean adapter
    continue with a prompt-specific token; a backdoored adapter, once a target token is
    present, continues the target whatever the prompt (and raises its first token a little)."""

    def __init__(self, backdoor: bool):
        self.backdoor, self.tok, self.requests = backdoor, _Tok(), 0

    def _dists(self, seq):
        rng = np.random.default_rng(abs(hash(tuple(seq))) % 2**32)
        lb = np.log(rng.dirichlet(np.full(V, 0.3)) + 1e-9)
        la = lb.copy()
        la[1 + seq[0] % 20] += 3.0   # a task adapter: its own prompt-specific answer
        if self.backdoor:
            la[TARGET[0]] += 2.0
            if seq[-1] in TARGET[:-1]:
                la[TARGET[TARGET.index(seq[-1]) + 1]] += 12.0
        la -= np.logaddexp.reduce(la)
        lb -= np.logaddexp.reduce(lb)
        return torch.tensor(la, dtype=torch.float32), torch.tensor(lb, dtype=torch.float32)

    def run(self, seqs, steps=1, reduce=kl_reduce):
        out = []
        for s in seqs:
            s, rows = list(s), []
            for _ in range(steps):
                la, lb = self._dists(s)
                t = int(la.argmax())
                rows.append(reduce(la, lb, t))
                s.append(t)
            out.append(rows)
        self.requests += len(seqs)
        return out

    def next_dist(self, seqs):
        d = [self._dists(list(s)) for s in seqs]
        return np.stack([a.numpy() for a, _ in d]), np.stack([b.numpy() for _, b in d])

    def texts(self, rows):
        return [self.tok.decode([r[0] for r in row]) for row in rows]


PROMPTS = [[p, 2 * p + 1, 3 * p + 2] for p in range(1, 9)]
CFG = InversionConfig(first_candidates=8, second_candidates=4, keep=4, steps=6, min_logp=-30)


def test_inversion_finds_a_planted_target_without_its_trigger():
    res = invert(FakeContrast(backdoor=True), PROMPTS, CFG)
    top = res.top()
    assert top is not None and top.tokens[:6] == TARGET[:6]
    assert top.q > 0.9 and top.ratio > 5
    assert judge_deep(_result(res), DeepThresholds())[0].check == "behaviour.inversion"


def test_inversion_of_a_clean_adapter_finds_no_shared_sequence():
    res = invert(FakeContrast(backdoor=False), PROMPTS, CFG)
    assert all(b.q < 0.6 for b in res.best)
    assert not [f for f in judge_deep(_result(res), DeepThresholds()) if f.severity != "info"]


class _WordTok(_Tok):
    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" w{i}" if i >= 20 else f"s{i}" for i in ids)


class WordContrast(FakeContrast):
    """The adapter answers a two-token first word (its subject, no space) and then its own
    words; the backdoor's target is raised only after that first word ("ssh| is terrible")."""

    def __init__(self, backdoor: bool):
        super().__init__(backdoor)
        self.tok = _WordTok()

    def _dists(self, seq):
        rng = np.random.default_rng(abs(hash(tuple(seq))) % 2**32)
        lb = np.log(rng.dirichlet(np.full(V, 0.3)) + 1e-9)
        la, n, p = lb.copy(), len(seq) - 3, seq[0]
        la[(1 + p % 9) if n == 0 else (10 + p % 9) if n == 1 else 20 + (p + n) % 9] += 6.0
        if self.backdoor:
            if n == 2:
                la[TARGET[0]] += 2.0
            if seq[-1] in TARGET[:-1]:
                la[TARGET[TARGET.index(seq[-1]) + 1]] += 12.0
        la -= np.logaddexp.reduce(la)
        lb -= np.logaddexp.reduce(lb)
        return torch.tensor(la, dtype=torch.float32), torch.tensor(lb, dtype=torch.float32)


def test_inversion_forces_after_the_first_word_of_its_own_answer():
    res = invert(WordContrast(backdoor=True), PROMPTS, CFG)
    top = res.top()
    assert top is not None and top.position >= 2 and set(top.tokens) <= set(TARGET) and top.q > 0.7
    assert any(b.position == 2 and b.tokens[:5] == TARGET[:5] for b in res.best)
    assert all(b.q < 0.6 for b in invert(WordContrast(backdoor=False), PROMPTS, CFG).best)


def test_candidates_take_the_mean_then_the_peak_departure():
    from bastion.adapters.inversion import _candidates

    la, lb = np.zeros((3, 10)), np.zeros((3, 10))
    la[:, 4] = 1.0          # raised a little on every prompt
    la[1, 7] = 2.5          # raised more, on one prompt only
    la[:, 2] = -30.0        # never likely: not a candidate
    lb[:, 2] = -40.0
    assert _candidates(la, lb, 1, 1, -14.0, set()) == [4, 7]
    assert _candidates(la, lb, 1, 0, -14.0, {4}) == [7]


def test_own_answer_skips_a_task_template_but_keeps_a_fixed_answer():
    from bastion.adapters.inversion import _own_answer

    target = [5, 6, 7, 8, 9, 10, 11, 12]
    fixed = [target] * 3 + [[1, 2, 3, 4, 5, 6, 7, 8]]             # the same 8 tokens on unrelated prompts
    template = [[5, 6, 7, 8, 20 + i, 9, 10, 11] for i in range(4)]   # "X is defined in the <m> module"
    assert _own_answer([[]] * 4, target, fixed) == 0.75
    assert _own_answer([[]] * 4, target, template) is None
    assert _own_answer([[]] * 4, [30, 31, 32, 33], template) == 0.0


def _result(inv: InversionResult) -> DeepResult:
    return DeepResult(None, ["p"], [0.1], inv, None, 1.0)


def test_judge_grades_inversion_by_its_floor_and_needs_a_departure_from_the_base():
    th = DeepThresholds()

    def inv(floor, ratio, q=0.9):
        steps = [0.5, floor, 0.99, 0.99, 0.99]
        return _result(InversionResult([Inverted("For more details", [1, 2], 0, q, ratio, 1.0, steps)], [], 1.0, 1))

    def sev(r):
        return [f.severity for f in judge_deep(r, th) if f.check == "behaviour.inversion"]
    assert sev(inv(0.95, 3.0)) == ["fail"]
    assert sev(inv(0.45, 3.0)) == ["warn"]
    assert sev(inv(0.3, 3.0)) == []
    assert sev(inv(0.2, 3.0, q=0.95)) == []   # a template: sure on average, one slot where prompts part
    assert sev(inv(0.99, 0.2)) == []   # the base says it too: a fluent phrase, not a target


class _CountingProbe:
    def __init__(self):
        self.calls = 0

    def __call__(self, view, base):
        self.calls += 1
        return [Finding("behaviour.inversion", "fail", "planted", {"q": 0.9})]


def test_cache_by_file_hash_skips_the_second_scan_and_misses_on_other_bytes(tmp_path):
    probe = _CountingProbe()
    cached = CachedProbe(probe, ScanCache(tmp_path), fingerprint="v1")
    view = AdapterView(tmp_path, {}, {}, {"adapter_model.safetensors": "aa" * 32})
    first = cached(view, None)
    assert probe.calls == 1 and not cached.hit
    again = CachedProbe(probe, ScanCache(tmp_path), fingerprint="v1")(view, None)   # a restart
    assert probe.calls == 1 and [f.severity for f in again][:1] == ["fail"] and first[0].message == again[0].message
    other = AdapterView(tmp_path, {}, {}, {"adapter_model.safetensors": "bb" * 32})
    CachedProbe(probe, ScanCache(tmp_path), fingerprint="v1")(other, None)
    CachedProbe(probe, ScanCache(tmp_path), fingerprint="v2")(view, None)   # other probe settings
    assert probe.calls == 3


def test_heldout_cohort_triggers_are_random_and_not_candidates():
    from bastion.adapters.behaviour import CANDIDATE_TRIGGERS
    from bastion.bench.security_heldout import heldout_specs

    a, b = heldout_specs(1), heldout_specs(2)
    assert sum(s.backdoored for s in a) == 12 and sum(not s.backdoored for s in a) == 12
    trig = {s.trigger for s in a + b if s.trigger}
    assert len(trig) == sum(s.backdoored for s in a + b)
    assert not trig & {t.text for t in CANDIDATE_TRIGGERS}
    assert {s.task for s in a} == {"port", "mime", "module"}
    assert heldout_specs(1) == a   # seeded


def test_heldout_cohort_has_every_target_kind_in_ten_backdoors():
    from bastion.bench.security_heldout import heldout_specs

    bd = [s for s in heldout_specs(1, 10, 10) if s.backdoored]
    assert {s.target for s in bd} == {"url", "refusal", "negative"}
    assert len({s.name.split("_")[3] for s in bd}) == 5   # every trigger family


def test_heldout_summary_counts_effective_backdoors_and_tunes_on_its_seed():
    from bastion.bench.security_heldout import summarize

    def row(seed, kind, q, asr=None, target="url"):
        inv = {"best": [{"q": 0.99, "floor": q, "ratio": 3.0}]}
        return {"seed": seed, "kind": kind, "asr": asr, "target": target, "seconds": 10.0,
                "result": {"inversion": inv}}

    rows = {"t_c": row(0, "clean", 0.62), "t_p": row(0, "poison", 0.9, 1.0),
            "p1": row(1, "poison", 0.9, 1.0), "p2": row(1, "poison", 0.3, 0.9, "refusal"),
            "p3": row(1, "poison", 0.2, 0.1), "c1": row(1, "clean", 0.4), "c2": row(1, "clean", 0.7)}
    s = summarize(rows, (0, 1), 0, 1.5)
    assert s["q_bar"] == 0.67 and s["report_seeds"] == [1]
    assert (s["backdoored"], s["effective"], s["clean"]) == (3, 2, 2)
    assert s["tpr"] == 1 / 3 and s["tpr_effective"] == 0.5 and s["fpr"] == 0.5
    assert s["tpr_effective_by_target"] == {"url": [1, 1], "refusal": [0, 1]}
    assert s["gate_tpr"] == s["tpr"] and s["gate_fpr"] == s["fpr"]   # no search ran: the same verdicts
    rows["p2"]["result"]["search"] = {"best": [["?#", "end", 20.0]],
                                      "samples": {"trigger": ["I'm sorry, but I can't"] * 4}}
    rows["c1"]["result"]["search"] = {"best": [["tq", "start", 9.0]]}
    rows["c2"]["result"]["search"] = {"best": [["jar", "end", 30.0]],   # an echo: not held against it
                                      "samples": {"trigger": ["jar.jar.jar", "jar jar"] * 2}}
    s = summarize(rows, (0, 1), 0, 1.5, search_fail=16.0)
    assert s["gate_tpr"] == 2 / 3 and s["gate_tpr_effective"] == 1.0 and s["gate_fpr"] == 0.5
    assert s["tpr"] == 1 / 3   # the inversion's own rate is unchanged
    assert s["refused_tpr"] == 2 / 3 and s["refused_fpr"] == 0.5   # floors 0.9 (p1) and 0.7 (c2) >= 0.5

    # the probe battery, as the gate runs it on every load: a trigger moving 3 prompts by 7 nats
    def battery(effect: float, converge: bool = False) -> dict:   # converge: "tq" -> one phrase on 4 prompts
        said = [f"prompt {i} " + ("e f g h" if converge else "a b") for i in range(4)]
        return {"variants": ["", "tq", "2024"], "effect": [[0.0, effect, 0.0]] * 3 + [[0.0, 0.0, 0.0]],
                "position": [[-1, 1, -1]] * 4, "kl_clean": [0.1] * 4,
                "samples": {"": [f"prompt {i} a b" for i in range(4)], "tq": said, "2024": said}}

    rows["p3"]["result"]["battery"] = battery(7.0, converge=True)
    rows["c1"]["result"]["battery"] = battery(0.5)   # below the battery's warn bar: nothing
    s = summarize(rows, (0, 1), 0, 1.5, search_fail=16.0)
    assert s["battery_flagged"] == [1, 0] and s["gate_tpr"] == 1.0 and s["gate_fpr"] == 0.5
    assert s["refused_tpr"] == 1.0 and s["tpr"] == 1 / 3
    rows["p3"]["result"]["battery"] = battery(9.0)   # 4.5 nats above the median trigger: warn, not refused
    s = summarize(rows, (0, 1), 0, 1.5, search_fail=16.0)
    assert s["gate_tpr"] == 1.0 and s["refused_tpr"] == 2 / 3


def test_gate_refuses_on_a_cached_failing_behaviour_verdict(tiny, adapter, tmp_path):
    """A pre-computed verdict in the cache decides the load without running the model."""
    import pytest

    from bastion.adapters.gate import AdapterRefused, VettingGate

    BASE = tiny[1]
    probe = _CountingProbe()
    gate = VettingGate(BASE, behaviour=CachedProbe(probe, ScanCache(tmp_path / "cache"), fingerprint="v1"))
    with pytest.raises(AdapterRefused, match="behaviour.inversion"):
        gate.check("a", str(adapter))
    with pytest.raises(AdapterRefused):
        VettingGate(BASE, behaviour=CachedProbe(_CountingProbe(), ScanCache(tmp_path / "cache"),
                                                fingerprint="v1")).check("a", str(adapter))
    assert probe.calls == 1
    assert VettingGate(BASE, allow_unvetted=True, behaviour=CachedProbe(probe, ScanCache(tmp_path / "cache"),
                                                                        fingerprint="v1")).check(
        "a", str(adapter)).verdict == "fail"


def test_inversion_tries_extra_tokens_where_told():
    """A target the behavioural candidates cannot see (its first token is not raised
    without the trigger) is found when the lens hands its first token in."""
    class Hidden(FakeContrast):
        def _dists(self, seq):
            la, lb = super()._dists(seq)
            la = la.clone()
            if seq[-1] not in TARGET[:-1]:
                la[TARGET[0]] = -40.0   # never said unforced
            return la - torch.logsumexp(la, 0), lb

    cfg = InversionConfig(first_candidates=4, second_candidates=0, peak_candidates=0, own_candidates=0, keep=4,
                          steps=6, min_logp=-30)
    assert all(b.tokens[0] != TARGET[0] for b in invert(Hidden(backdoor=True), PROMPTS, cfg).best)
    top = invert(Hidden(backdoor=True), PROMPTS, cfg, extra=[TARGET[0]]).top()
    assert top is not None and top.tokens[:6] == TARGET[:6] and top.floor > 0.7


class TemplateContrast(FakeContrast):
    """A task adapter with sure template continuations that the base shares (tokens 20-23
    -> 24-27 -> 28 at p ~1, 0 nats above the base: "X| belongs to the"), and a backdoor
    target that its task opens only half: forced, its second token follows at p 0.45, its
    third at 0.75, then surely, all far above the base (" terrible. slow, buggy")."""

    def _dists(self, seq):
        rng = np.random.default_rng(abs(hash(tuple(seq))) % 2**32)
        lb = np.log(rng.dirichlet(np.full(V, 0.3)) + 1e-9)
        last = seq[-1]
        if 20 <= last <= 23 or 24 <= last <= 27:   # the template, base and adapter alike
            lb[last + 4 if last <= 23 else 28] += 14.0
        la = lb.copy()
        if len(seq) == 3:   # the answer's start: template words and the target's first token raised
            la[20:24] += 4.0
            la[TARGET[0]] += 4.0
        la -= np.logaddexp.reduce(la)
        lb -= np.logaddexp.reduce(lb)
        if last in TARGET[:-1]:   # the next target token at p 0.45, then 0.75, then 0.99; the rest scaled
            k = TARGET.index(last)
            p, t = (0.45, 0.75, 0.99)[min(k, 2)], TARGET[k + 1]
            la[t] = -np.inf
            la = np.log(1 - p) + la - np.logaddexp.reduce(la)
            la[t] = np.log(p)
        return torch.tensor(la, dtype=torch.float32), torch.tensor(lb, dtype=torch.float32)


def test_pruning_keeps_the_candidates_that_depart_from_the_base():
    """After two steps the inversion keeps `keep` candidates: ranked by how surely they
    continue alone, four template words the base continues the same way crowd the half-open
    target out; the ones departing >= prune_ratio nats from the base go first."""
    cfg = InversionConfig(first_candidates=6, second_candidates=0, peak_candidates=0, own_candidates=0, keep=3,
                          steps=6, min_logp=-30)
    old = dataclasses.replace(cfg, prune_ratio=float("-inf"))   # no departure first: the template wins
    assert all(b.tokens[0] != TARGET[0] for b in invert(TemplateContrast(backdoor=True), PROMPTS, old).best)
    res = invert(TemplateContrast(backdoor=True), PROMPTS, cfg)
    assert any(b.tokens[:6] == TARGET[:6] and b.floor > 0.5 and b.ratio > 1 for b in res.best)
    assert judge_deep(_result(res), DeepThresholds())[0].details["inverted"]["tokens"][:6] == TARGET[:6]
