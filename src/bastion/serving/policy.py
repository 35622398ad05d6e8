"""Request-level policy, fixed at start and applied around the engine: which adapters
may load (the vetting gate), which requests CleanGen defends, which output guards a
response passes through. The engine sees only what a policy produces (a token filter and
the tracks it asks for); the server and the other front ends ask the policy."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from bastion.config import Config, GuardConfig
from bastion.guard.cleangen import CleanGen, CleanGenPolicy
from bastion.guard.leak import LeakGuard


class Gate(Protocol):
    def check(self, name: str, path: str) -> Any:
        """Vet adapter `name` at `path`: its report, or raise (ValueError) to refuse it.
        A gate may also have `check_static(name, path) -> (report, scan_needed)`: the
        quick part at once, the rest (`check`) left to a background scan."""


@dataclass(frozen=True)
class Vetting:
    """The quick part of vetting an adapter: its report so far, and whether the gate's
    behaviour scan must still run (in the background) before the adapter is served."""

    report: Any = None
    scan_needed: bool = False

    @property
    def verdict(self) -> str | None:
        return getattr(self.report, "verdict", None)


class RequestRejected(ValueError):
    """The request asks for something the policy cannot give; `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ServingPolicy:
    gate: Gate | None = None  # None: adapters load unvetted (tests, trusted embedders)
    cleangen: CleanGenPolicy = field(default_factory=CleanGenPolicy)
    guard: GuardConfig = field(default_factory=GuardConfig)

    @classmethod
    def from_config(cls, config: Config, gate: Gate | None = None) -> "ServingPolicy":
        return cls(gate=gate, cleangen=CleanGenPolicy(dict(config.adapters.cleangen)), guard=config.guard)

    def token_filter(self, adapter: str | None, cleangen: bool | None) -> CleanGen | None:
        """The filter a request runs with: CleanGen per its "cleangen" field (None: the
        adapter's default)."""
        try:
            return self.cleangen.for_request(adapter, cleangen)
        except ValueError as e:
            raise RequestRejected(str(e), param="cleangen") from None

    def leak_guard(self, system_texts: Iterable[str] = ()) -> LeakGuard | None:
        """The output guard of one response (None: nothing to protect)."""
        return LeakGuard.for_request(self.guard, system_texts)

    def vet(self, name: str, path: str) -> Any:
        """The gate's report on an adapter before it loads (refusal: ValueError)."""
        return self.gate.check(name, path) if self.gate is not None else None

    def vet_static(self, name: str, path: str) -> Vetting:
        """What can be decided at once (refusal: ValueError); `scan_needed`: `vet` must
        still run before the adapter is served. Gates without a quick part vet fully."""
        if self.gate is None:
            return Vetting()
        static = getattr(self.gate, "check_static", None)
        if static is None:
            return Vetting(self.gate.check(name, path))
        report, needed = static(name, path)
        return Vetting(report, bool(needed))
