"""The serving policy: fixed at start from the Config, it answers which filter a request
runs with, which guard a response passes, and whether an adapter may load."""

from __future__ import annotations

import pytest

from bastion.config import AdapterConfig, Config, GuardConfig
from bastion.serving.policy import RequestRejected, ServingPolicy


class _Gate:
    def __init__(self):
        self.checked = []

    def check(self, name, path):
        self.checked.append((name, path))
        if "bad" in path:
            raise ValueError(f"adapter {name!r} refused by the vetting gate")
        return "report"


def test_from_config_and_answers():
    config = Config(adapters=AdapterConfig(loras=(("a", "/x"),), cleangen=(("a", 9.0),)),
                    guard=GuardConfig(canaries=("ZX-1",)))
    gate = _Gate()
    policy = ServingPolicy.from_config(config, gate)
    assert policy.token_filter("a", None).alpha == 9.0 and policy.token_filter("a", False) is None
    assert policy.token_filter(None, None) is None
    with pytest.raises(RequestRejected) as e:
        policy.token_filter(None, True)
    assert e.value.param == "cleangen"
    assert policy.leak_guard() is not None  # the canary is guarded on every response
    assert policy.vet("a", "/ok") == "report" and gate.checked == [("a", "/ok")]
    with pytest.raises(ValueError, match="refused"):
        policy.vet("b", "/bad")


def test_default_policy_guards_nothing_and_vets_nothing():
    policy = ServingPolicy()
    assert policy.leak_guard(["You are a helpful assistant with a long secret prompt."]) is None
    assert policy.vet("a", "/anything") is None
    with pytest.raises(Exception):  # frozen: a serving policy is not changed after start
        policy.gate = _Gate()


def test_adapter_config_checks_names_and_cleangen_targets():
    with pytest.raises(ValueError, match="no adapter of that name"):
        AdapterConfig(loras=(("a", "/x"),), cleangen=(("b", 20.0),))
    with pytest.raises(ValueError, match="adapter name"):
        AdapterConfig(loras=(("..", "/x"),))
    with pytest.raises(ValueError, match="unique"):
        AdapterConfig(loras=(("a", "/x"), ("a", "/y")))
    assert AdapterConfig(loras=(("a", "/x"),)).enabled  # adapters at start need the slots


def test_vet_static_is_the_whole_check_for_gates_without_a_quick_part():
    class _TwoStep(_Gate):
        def check_static(self, name, path):
            return "static report", True

    gate = _Gate()
    vetting = ServingPolicy(gate=gate).vet_static("a", "/ok")
    assert vetting.report == "report" and not vetting.scan_needed and gate.checked == [("a", "/ok")]
    assert ServingPolicy().vet_static("a", "/x").report is None
    two = _TwoStep()
    assert ServingPolicy(gate=two).vet_static("a", "/ok").scan_needed and two.checked == []
    with pytest.raises(ValueError, match="refused"):
        ServingPolicy(gate=_Gate()).vet_static("b", "/bad")
