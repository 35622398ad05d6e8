"""The vetting gate in front of the adapter registry: every load is scanned first.

A `fail` verdict refuses the adapter unless the operator passed --allow-unvetted, and
that override is logged at WARNING with the findings it overrode; `warn` loads and logs
the warnings. The report of every load is kept, so /v1/models and audits can show it.

Two steps for callers that run the behaviour scan in the background (the server):
`check_static` runs what is quick (artifact, config, weights, and the behaviour scan's
cached verdict for these file hashes) and says whether the scan itself still has to run;
`check` is the whole scan. A behaviour probe that raises is a `fail` finding: an adapter
whose scan could not run is not served unvetted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from bastion.engine.lora.peft import AdapterError

log = logging.getLogger("bastion.adapters.gate")


class AdapterRefused(AdapterError):
    """The vetting gate failed the adapter; the message lists the failing findings and
    `report` is the scan report (None when the path could not be read)."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


@dataclass
class VettingGate:
    base: object  # scanner.BaseModelInfo of the served model
    allow_unvetted: bool = False
    reports: dict = field(default_factory=dict)  # adapter name -> ScanReport
    behaviour: object = None  # scan_adapter's behaviour probe (None: static checks only)

    @classmethod
    def for_model(cls, model_path: str | None, *, served_name: str | None = None,
                  allow_unvetted: bool = False, deep: bool = False,
                  cache_dir: str | None = None, threads: int | None = None,
                  worker: bool = True) -> VettingGate:
        """`deep`: every load also runs the behaviour scan (battery, task probes, target
        inversion, trigger search; deep_scan.py, ~2 min per adapter on 2 cores), its
        findings cached by file hash under `cache_dir` (default ~/.cache/bastion/scans).
        The scan's model (a second copy of `model_path`) is built on the first scan, in a
        worker process of its own (`worker`; scan_worker.py says why) or in this one."""
        from bastion.adapters.cli import load_base_info

        probe = None
        if deep:
            from bastion.adapters.deep_scan import CachedProbe, DeepProbe, ScanCache
            from bastion.adapters.scan_worker import ProcessProbe

            settings = {"model": model_path, "threads": threads}
            deep_probe = ProcessProbe(DeepProbe, **settings) if worker else DeepProbe(**settings)
            probe = CachedProbe(deep_probe, ScanCache(cache_dir))
        return cls(load_base_info(model_path, name=served_name), allow_unvetted, behaviour=probe)

    def close(self) -> None:
        """Stop what the behaviour scan holds (its worker process); a later scan restarts it."""
        closer = getattr(self.behaviour, "close", None)
        if closer is not None:
            closer()

    def check(self, name: str, path: str):
        """The whole scan (static checks and behaviour scan): its report, or AdapterRefused."""
        probe = _FailClosed(self.behaviour) if self.behaviour is not None else None
        return self._judge(name, path, self._scan(name, path, probe))

    def check_static(self, name: str, path: str):
        """(report, scan_needed): the checks that run at once, with the behaviour scan's
        verdict when the scan cache has it. A fail is judged here as by `check`; with
        `scan_needed` the report is the static part only and `check` must still run."""
        lookup = _CacheLookup(self.behaviour) if self.behaviour is not None else None
        report = self._scan(name, path, lookup)
        if lookup is not None and lookup.missed and report.verdict != "fail":
            return report, True
        return self._judge(name, path, report), False

    def _scan(self, name: str, path: str, behaviour):
        from bastion.adapters.scanner import scan_adapter

        try:
            return scan_adapter(path, base=self.base, behaviour=behaviour)
        except OSError as e:
            raise AdapterRefused(f"adapter {name!r}: cannot read {path}: {e}") from e

    def _judge(self, name: str, path: str, report):
        fails = [f"{f.check}: {f.message}" for f in report.findings if f.severity == "fail"]
        if report.verdict == "fail":
            if not self.allow_unvetted:
                raise AdapterRefused(f"adapter {name!r} refused by the vetting gate: " + "; ".join(fails), report)
            log.warning("OVERRIDE --allow-unvetted: loading adapter %r (%s) despite a failing scan: %s",
                        name, path, "; ".join(fails))
        elif report.verdict == "warn":
            log.warning("adapter %r (%s) passed with warnings: %s", name, path,
                        "; ".join(f"{f.check}: {f.message}" for f in report.findings if f.severity == "warn"))
        self.reports[name] = report
        return report


class _FailClosed:
    """A behaviour probe whose crash (model not loadable, out of memory, ...) is a fail
    finding rather than an exception: not scanned means not served."""

    def __init__(self, probe):
        self.probe = probe

    def __call__(self, view, base):
        from bastion.adapters.scan_worker import ScanStopped
        from bastion.adapters.scanner import Finding

        try:
            return self.probe(view, base)
        except Exception as e:  # whatever stopped the scan, the adapter is unvetted
            if isinstance(e, ScanStopped):  # shutdown mid-scan: expected, no traceback
                log.info("behaviour scan of %s stopped: %s", view.path, e)
            else:
                log.exception("behaviour scan of %s could not run", view.path)
            return [Finding("behaviour", "fail", f"the behaviour scan could not run ({type(e).__name__}: {e}); "
                            "an adapter is not served before its scan passes")]


class _CacheLookup:
    """The behaviour layer as far as the scan cache answers it: the cached findings, or a
    note that the scan is still to run (`missed`)."""

    def __init__(self, probe):
        self.probe, self.missed = probe, False

    def __call__(self, view, base):
        from bastion.adapters.scanner import Finding

        lookup = getattr(self.probe, "lookup", None)
        found = lookup(view, base) if lookup is not None else None
        if found is None:
            self.missed = True
            return [Finding("behaviour", "info", "behaviour scan pending: it runs before the adapter is served")]
        return found
