"""The vetting gate in front of the adapter registry: every load is scanned first.

A `fail` verdict refuses the adapter unless the operator passed --allow-unvetted, and
that override is logged at WARNING with the findings it overrode; `warn` loads and logs
the warnings. The report of every load is kept, so /v1/models and audits can show it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from bastion.engine.lora.peft import AdapterError

log = logging.getLogger("bastion.adapters.gate")


class AdapterRefused(AdapterError):
    """The vetting gate failed the adapter; the message lists the failing findings."""


@dataclass
class VettingGate:
    base: object  # scanner.BaseModelInfo of the served model
    allow_unvetted: bool = False
    reports: dict = field(default_factory=dict)  # adapter name -> ScanReport
    behaviour: object = None  # scan_adapter's behaviour probe (None: static checks only)

    @classmethod
    def for_model(cls, model_path: str | None, *, served_name: str | None = None,
                  allow_unvetted: bool = False, deep: bool = False,
                  cache_dir: str | None = None) -> VettingGate:
        """`deep`: every load also runs the behaviour scan (battery, task probes, target
        inversion, trigger search; deep_scan.py, ~1 min per adapter on 2 cores), its
        findings cached by file hash under `cache_dir` (default ~/.cache/bastion/scans)."""
        from bastion.adapters.cli import load_base_info

        probe = None
        if deep:
            from bastion.adapters.deep_scan import CachedProbe, DeepProbe, ScanCache

            probe = CachedProbe(DeepProbe(model=model_path), ScanCache(cache_dir))
        return cls(load_base_info(model_path, name=served_name), allow_unvetted, behaviour=probe)

    def check(self, name: str, path: str):
        from bastion.adapters.scanner import scan_adapter

        try:
            report = scan_adapter(path, base=self.base, behaviour=self.behaviour)
        except OSError as e:
            raise AdapterRefused(f"adapter {name!r}: cannot read {path}: {e}") from e
        fails = [f"{f.check}: {f.message}" for f in report.findings if f.severity == "fail"]
        if report.verdict == "fail":
            if not self.allow_unvetted:
                raise AdapterRefused(f"adapter {name!r} refused by the vetting gate: " + "; ".join(fails))
            log.warning("OVERRIDE --allow-unvetted: loading adapter %r (%s) despite a failing scan: %s",
                        name, path, "; ".join(fails))
        elif report.verdict == "warn":
            log.warning("adapter %r (%s) passed with warnings: %s", name, path,
                        "; ".join(f"{f.check}: {f.message}" for f in report.findings if f.severity == "warn"))
        self.reports[name] = report
        return report
