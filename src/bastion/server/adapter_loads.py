"""Every adapter load of one server, from its quick checks to served or refused.

A load (POST /v1/load_lora_adapter, or `--lora` at start) runs the gate's quick part at
once: artifact, config and weight checks, plus the behaviour scan's verdict when the scan
cache holds one for these file hashes. A fail is refused there (400, or exit at start);
a complete verdict loads the adapter at once. Otherwise the adapter is *pending*:
/v1/models lists it with "vetting": "pending", a request naming it gets 409
adapter_pending, and one vetting thread runs the behaviour scans one at a time, in the
order they came (a scan is about two minutes of CPU on 2 cores, in the gate's worker
process; two at once would only slow both, and the serving). pass/warn: the adapter is
loaded into the engine between two steps and served. fail: it is never loaded (unless
--allow-unvetted: loaded, logged) and leaves /v1/models; its report stays in GET
/v1/lora_adapters. Unloading a pending adapter cancels it: a scan already running
finishes (its verdict is cached) and is dropped. Nothing here raises into the server: a
failed scan or load is a refusal.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bastion.server.served_models import PENDING, ServedModel, ServedModels
from bastion.serving.policy import ServingPolicy

log = logging.getLogger("bastion.server.adapters")

SERVED, REFUSED = "served", "refused"
KEEP_REFUSED = 64  # refused loads kept for GET /v1/lora_adapters (oldest dropped first)


@dataclass(eq=False)
class AdapterLoad:
    name: str
    path: str | None
    state: str  # pending | served | refused
    report: Any = None  # the gate's ScanReport (the static part while pending; None: no gate)
    error: str | None = None  # why it was refused
    queued_at: float = field(default_factory=time.time)
    scan_started_at: float | None = None
    finished_at: float | None = None
    cancelled: bool = False

    @property
    def vetting(self) -> str | None:
        return PENDING if self.state == PENDING else getattr(self.report, "verdict", None)

    def to_dict(self, *, full: bool = False) -> dict:
        """The listing entry (findings only; `full`: the whole scan report)."""
        report = self.report
        d = {"lora_name": self.name, "lora_path": self.path, "state": self.state, "vetting": self.vetting,
             "error": self.error, "queued_at": round(self.queued_at, 3),
             "scan_started_at": _round(self.scan_started_at), "finished_at": _round(self.finished_at),
             "findings": [f.to_dict() for f in getattr(report, "findings", None) or []]}
        if self.state == PENDING:
            d["scanning"] = self.scan_started_at is not None
        if full and report is not None and hasattr(report, "to_dict"):
            d["report"] = report.to_dict()
        return d


def vet_at_start(policy: ServingPolicy, engine: Any, loras) -> list[tuple[str, str, Any]]:
    """`--lora` adapters before the server starts: each one's quick checks (a fail raises:
    the server does not start); those vetted in full (static only, or the scan's verdict
    cached) are loaded now, the others returned for build_app(pending_adapters=)."""
    pending = []
    for name, path in loras:
        vetting = policy.vet_static(name, path)
        if vetting.scan_needed:
            pending.append((name, path, vetting.report))
        else:
            engine.load_adapter_before_start(name, path)
    return pending


def _round(t: float | None) -> float | None:
    return None if t is None else round(t, 3)


class NameTaken(ValueError):
    """Another load of this name is served, pending or under way; `status`: the HTTP
    status that says so (400 served, 409 a load or unload under way)."""

    def __init__(self, message: str, status: int = 409, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class AdapterLoads:
    """The loads of one server and its vetting thread (started on the first queued scan)."""

    def __init__(self, engine: Any, models: ServedModels, policy: ServingPolicy) -> None:
        self._engine, self._models, self._policy = engine, models, policy
        self._lock = threading.Lock()
        self._loads: dict[str, AdapterLoad] = {}
        self._reserved: set[str] = set()  # names whose load request is being handled
        self._queue: queue.SimpleQueue[AdapterLoad | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._busy = False  # a scan (or its engine load) is in progress

    # ------------------------------------------------------------ requests
    def reserve(self, name: str) -> None:
        """Hold `name` while its load request is handled (NameTaken if it is in use)."""
        with self._lock:
            taken = next((m for m in self._models.all() if m.id == name), None)
            if taken is not None and taken.pending:
                raise NameTaken(f"adapter {name!r} is already being vetted", code="adapter_pending")
            if taken is not None:
                raise NameTaken(f"model id {name!r} is already served", status=400)
            if name in self._reserved:
                raise NameTaken(f"a load of adapter {name!r} is under way")
            if name in getattr(self._engine, "adapter_names", list)():
                raise NameTaken(f"adapter {name!r} is still being unloaded; retry in a moment")
            self._reserved.add(name)

    def release(self, name: str) -> None:
        with self._lock:
            self._reserved.discard(name)

    def vet_now(self, name: str, path: str):
        """The gate's quick part (a Vetting; refusal: ValueError). Blocking: call it off
        the event loop."""
        return self._policy.vet_static(name, path)

    def served(self, name: str, path: str | None, report: Any) -> None:
        """`name` was loaded into the engine with this (complete) report: serve it."""
        with self._lock:
            self._loads[name] = AdapterLoad(name, path, SERVED, report, finished_at=time.time())
            self._models.replace(self._served_model(name, report))

    def refused(self, name: str, path: str | None, report: Any, error: str) -> None:
        """A load refused at once (static fail, bad path, too large): listed, not served."""
        with self._lock:
            if self._current(name) is None:  # never shadow a served or pending load of that name
                self._keep_refused(AdapterLoad(name, path, REFUSED, report, error, finished_at=time.time()))

    def enqueue(self, name: str, path: str | None, report: Any) -> int:
        """Register `name` as pending and queue its behaviour scan; its queue position
        (1: next)."""
        with self._lock:
            if self._closed:
                raise NameTaken("the server is shutting down")
            job = AdapterLoad(name, path, PENDING, report)
            self._loads[name] = job
            base = self._models.lookup(None)
            self._models.replace(ServedModel(id=name, engine=base.engine, parent=base.id, vetting=PENDING))
            position = sum(j.state == PENDING and j.scan_started_at is None for j in self._loads.values())
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="bastion-vetting", daemon=True)
                self._thread.start()
        self._queue.put(job)
        log.info("adapter %r: static checks passed; behaviour scan queued (position %d)", name, position)
        return position

    def cancel(self, name: str) -> bool:
        """Drop a pending load (True), or False when `name` is not pending."""
        with self._lock:
            job = self._loads.get(name)
            if job is None or job.state != PENDING:
                return False
            job.cancelled = True
            del self._loads[name]
            self._models.remove(name)
        log.info("adapter %r: pending load cancelled", name)
        return True

    def forget(self, name: str) -> None:
        """A served adapter was unloaded."""
        with self._lock:
            if (job := self._loads.get(name)) is not None and job.state == SERVED:
                del self._loads[name]

    def list(self) -> list[dict]:
        with self._lock:
            return [job.to_dict() for job in self._loads.values()]

    def get(self, name: str) -> dict | None:
        with self._lock:
            job = self._loads.get(name)
            return job.to_dict(full=True) if job is not None else None

    @property
    def scanning(self) -> bool:
        """A scan (or its engine load) is in progress in the vetting thread."""
        with self._lock:
            return self._busy

    def close(self) -> None:
        """No more scans (server shutdown). The gate's scan worker process, if any, is
        ended, and the scan in progress with it (its adapter is refused, nothing cached).
        A gate that scans in this process leaves its scan running in the daemon thread:
        `bastion serve` then leaves without finalizing the interpreter (cli.py), since
        finalizing under a thread inside torch's C++ code aborts."""
        with self._lock:
            self._closed = True
        self._queue.put(None)
        closer = getattr(self._policy.gate, "close", None)
        if closer is not None:
            try:
                closer()
            except Exception:  # noqa: BLE001 - shutting down: a worker that will not stop dies with us
                log.exception("closing the vetting gate failed")

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                self._busy = True
            try:
                self._vet_and_load(job)
            except Exception as e:  # a bug here must not stop the next scans
                log.exception("vetting adapter %r failed", job.name)
                self._finish(job, REFUSED, job.report, f"vetting failed ({type(e).__name__})")
            finally:
                with self._lock:
                    self._busy = False

    def _vet_and_load(self, job: AdapterLoad) -> None:
        with self._lock:
            if job.cancelled:
                return
            job.scan_started_at = time.time()
        try:
            report = self._policy.vet(job.name, job.path)  # the whole scan: minutes of CPU at most
        except ValueError as e:  # the gate's refusal (fail), or an unreadable adapter
            log.warning("adapter %r not served: %s", job.name, e)
            self._finish(job, REFUSED, getattr(e, "report", None) or job.report, str(e))
            return
        with self._lock:
            if job.cancelled:
                return
        try:  # between two engine steps, from this thread: its own event loop waits for it
            asyncio.run(self._engine.load_adapter(job.name, job.path))
        except Exception as e:  # noqa: BLE001 - slots full, engine stopped: not served, say why
            verdict = getattr(report, "verdict", None)
            log.warning("adapter %r passed vetting (%s) but could not be loaded: %s", job.name, verdict, e)
            self._finish(job, REFUSED, report, f"vetted ({verdict}) but not loaded: {e}")
            return
        with self._lock:
            if not job.cancelled:
                job.state, job.report, job.finished_at = SERVED, report, time.time()
                self._models.replace(self._served_model(job.name, report))
                log.info("adapter %r served after its behaviour scan (%s, %.0f s)", job.name,
                         job.vetting, job.finished_at - job.scan_started_at)
                return
        try:  # unloaded while it was being loaded
            asyncio.run(self._engine.unload_adapter(job.name))
        except Exception:  # the engine is stopping; nothing serves it either way
            log.exception("adapter %r: unloading a cancelled load failed", job.name)

    def _finish(self, job: AdapterLoad, state: str, report: Any, error: str | None) -> None:
        with self._lock:
            if job.cancelled or self._loads.get(job.name) is not job:
                return
            job.state, job.report, job.error, job.finished_at = state, report, error, time.time()
            if state == REFUSED:
                del self._loads[job.name]
                self._keep_refused(job)
                self._models.remove(job.name)

    # ------------------------------------------------------------ under the lock
    def _current(self, name: str) -> AdapterLoad | None:
        job = self._loads.get(name)
        return job if job is not None and job.state != REFUSED else None

    def _keep_refused(self, job: AdapterLoad) -> None:
        self._loads.pop(job.name, None)
        self._loads[job.name] = job
        refused = [n for n, j in self._loads.items() if j.state == REFUSED]
        for n in refused[: max(0, len(refused) - KEEP_REFUSED)]:
            del self._loads[n]

    def _served_model(self, name: str, report: Any) -> ServedModel:
        base = self._models.lookup(None)
        return ServedModel(id=name, engine=self._engine.with_adapter(name), parent=base.id,
                           vetting=getattr(report, "verdict", None))
