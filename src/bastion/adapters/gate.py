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

    @classmethod
    def for_model(cls, model_path: str | None, *, served_name: str | None = None,
                  allow_unvetted: bool = False) -> "VettingGate":
        from bastion.adapters.cli import load_base_info

        return cls(load_base_info(model_path, name=served_name), allow_unvetted)

    def check(self, name: str, path: str):
        from bastion.adapters.scanner import scan_adapter

        try:
            report = scan_adapter(path, base=self.base)
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
