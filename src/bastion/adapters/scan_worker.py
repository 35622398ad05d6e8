"""A behaviour probe run in a worker process of its own (the server's vetting gate).

Why a process and not the vetting thread: the scan's torch work, run from a second
thread of the serving process, gets a second libgomp (OpenMP) thread pool beside the
serving engine's. With more OpenMP threads in the process than cores, libgomp shortens
its spin-wait, and every small parallel region of the scan then waits on a futex wake:
measured on 2 cores, the target inversion took 96-119 s beside a serving engine against
48-53 s alone (docs/SECURITY.md). A spawned process owns its own OpenMP runtime, sized to
its own threads, and a scan there runs as fast as `bastion scan --deep`.

`ProcessProbe(factory, **kwargs)` builds `factory(**kwargs)` (e.g. DeepProbe) in the worker,
started on the first scan and kept for the next ones (its model is built once). Each call
sends the parsed adapter (AdapterView: numpy factors, never the path to re-read) and gets
the findings back. A probe that raises, or a worker that dies (killed, out of memory),
raises ScanWorkerError here: the gate's fail-closed wrapper turns it into a fail finding,
and the next scan starts a fresh worker. The worker exits when its parent does, even one
killed with SIGKILL (it watches its parent pid), and `close()` ends it at server shutdown.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import traceback
from typing import Any, Callable

log = logging.getLogger("bastion.adapters.scan_worker")

_PARENT_POLL_S = 0.5


class ScanWorkerError(RuntimeError):
    """The scan did not complete in the worker: the probe raised there, or the worker died."""


class ScanStopped(ScanWorkerError):
    """The scan was abandoned because the gate was closed (server shutdown): expected, no fault."""


class ProcessProbe:
    """A behaviour probe (`probe(view, base) -> findings`) that runs `factory(**kwargs)` in a
    spawned worker process. `fingerprint()` is the local probe's (same factory, same
    settings; building it must be cheap: DeepProbe builds its model on first use)."""

    def __init__(self, factory: Callable[..., Any], **kwargs: Any) -> None:
        self.factory, self.kwargs = factory, kwargs
        self._local = factory(**kwargs)  # settings only: never run here
        self._lock = threading.Lock()  # one scan at a time through the pipe
        self._proc = None
        self._conn = None
        self._closing = False  # close() under way: a scan cut short says so
        self.last = None  # the probe's `last` after the latest scan (DeepProbe: a DeepResult)

    def fingerprint(self) -> str:
        return self._local.fingerprint()

    @property
    def pid(self) -> int | None:
        """The worker's pid while it runs (None: not started, or ended)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.is_alive() else None

    def __call__(self, view: Any, base: Any) -> list:
        with self._lock:
            conn = self._start()
            try:
                conn.send(("scan", view, base))
                kind, payload, last = conn.recv()
            except (EOFError, OSError, BrokenPipeError) as e:
                if self._closing:
                    raise ScanStopped("the scan was stopped: the gate was closed (server shutdown)") from None
                code = self._reap()
                raise ScanWorkerError(f"the scan worker exited during the scan ({_exit_reason(code)})") from e
            if kind == "error":
                raise ScanWorkerError(f"the scan raised in its worker: {payload}")
            self.last = last
            return payload

    def close(self, timeout: float = 5.0) -> None:
        """End the worker (server shutdown). A scan in progress is abandoned: its caller
        gets ScanWorkerError, and nothing is cached for it."""
        proc, conn = self._proc, self._conn
        if proc is None:
            return
        self._closing = True
        try:
            conn.send(None)
        except (OSError, BrokenPipeError, ValueError):
            pass
        proc.join(0.1)
        if proc.is_alive():
            proc.terminate()  # mid-scan: the worker holds no state worth a clean exit
            proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout)
        with self._lock:  # after the scan in progress, if any, has seen its pipe close
            self._reap()
            self._closing = False

    # ------------------------------------------------------------ the worker's lifetime
    def _start(self):
        if self._proc is not None and self._proc.is_alive():
            return self._conn
        self._reap()
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited OpenMP pool
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, name="bastion-scan-worker", daemon=True,
                           args=(child, self.factory, self.kwargs, os.getpid(), logging.getLogger().level))
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        log.info("behaviour scan worker started (pid %d)", proc.pid)
        return parent

    def _reap(self) -> int | None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        code = None
        if proc is not None:
            proc.join(1.0)
            code = proc.exitcode
        if conn is not None:
            conn.close()
        return code


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running, pipe broken"
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


def _serve(conn, factory, kwargs: dict, parent_pid: int, level: int) -> None:
    """The worker: build the probe, then answer scans until told to stop or orphaned."""
    logging.basicConfig(level=level or logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s [scan worker]: %(message)s")
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()
    probe = factory(**kwargs)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent closed its end
            return
        if msg is None:
            return
        _, view, base = msg
        try:
            reply = ("ok", probe(view, base), getattr(probe, "last", None))
        except Exception as e:  # noqa: BLE001 - reported to the gate, which fails the adapter closed
            log.error("behaviour scan of %s raised:\n%s", getattr(view, "path", "?"), traceback.format_exc())
            reply = ("error", f"{type(e).__name__}: {e}", None)
        try:
            conn.send(reply)
        except (OSError, BrokenPipeError):
            return


def _exit_with_parent(parent_pid: int) -> None:
    # NOTE: a parent killed with SIGKILL runs no cleanup; the worker is then re-parented
    # (to init or a subreaper) and would scan on for minutes. Leave at once instead.
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_POLL_S)
    os._exit(0)
