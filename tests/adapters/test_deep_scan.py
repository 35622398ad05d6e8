"""Target inversion, the deep-scan judge, the scan cache and the held-out cohort specs,
on crafted stand-ins for the engine (no model is loaded)."""

from __future__ import annotations

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


def _result(inv: InversionResult) -> DeepResult:
    return DeepResult(None, ["p"], [0.1], inv, None, 1.0)


def test_judge_grades_inversion_by_q_and_needs_a_departure_from_the_base():
    th = DeepThresholds()
    def inv(q, ratio):
        return _result(InversionResult([Inverted("For more details", [1, 2], 0, q, ratio, 1.0)], [], 1.0, 1))
    sev = lambda r: [f.severity for f in judge_deep(r, th) if f.check == "behaviour.inversion"]
    assert sev(inv(0.95, 3.0)) == ["fail"]
    assert sev(inv(0.65, 3.0)) == ["warn"]
    assert sev(inv(0.5, 3.0)) == []
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
