"""The behaviour scan's worker process (scan_worker.ProcessProbe): findings come back from
another process, the worker is kept between scans, a probe that raises or a worker that
dies is a ScanWorkerError (a fail finding through the gate), and an orphaned worker exits.
The probes here are stand-ins (no model); the real DeepProbe in a worker is exercised by
tests/server/test_adapter_vetting_background.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bastion.adapters.gate import VettingGate
from bastion.adapters.scan_worker import ProcessProbe, ScanStopped, ScanWorkerError
from bastion.adapters.scanner import AdapterView, Finding

ROOT = Path(__file__).resolve().parents[2]


class PidProbe:
    """Reports the pid it ran in and what it was given; `fail_on`: raise for that path;
    `sleep_on`: block for a minute on that path (to be killed mid-scan)."""

    def __init__(self, tag: str = "t", fail_on: str | None = None, sleep_on: str | None = None):
        self.tag, self.fail_on, self.sleep_on, self.last = tag, fail_on, sleep_on, None

    def fingerprint(self) -> str:
        return f"pid-probe-{self.tag}"

    def __call__(self, view, base):
        if str(view.path) == self.fail_on:
            raise ValueError("planted failure")
        if str(view.path) == self.sleep_on:
            time.sleep(60)
        self.last = {"pid": os.getpid()}
        (a, b, scale), = view.factors.values()
        return [Finding("behaviour", "info", f"{self.tag} scanned {view.path}",
                        {"pid": os.getpid(), "sum": float(a.sum() + b.sum()) * scale, "base": base})]


def _view(path: str = "adapter") -> AdapterView:
    a, b = np.ones((2, 8), np.float32), np.full((8, 2), 0.5, np.float32)
    return AdapterView(Path(path), {"r": 2}, {(0, "q_proj"): (a, b, 2.0)}, {"adapter.safetensors": "ab12"})


@pytest.fixture
def probe():
    p = ProcessProbe(PidProbe, tag="w", fail_on="bad", sleep_on="slow")
    yield p
    p.close()


def test_findings_come_back_from_one_kept_worker(probe):
    assert probe.fingerprint() == "pid-probe-w" and probe.pid is None  # nothing started to fingerprint
    (f,) = probe(_view(), "base-info")
    pid = f.details["pid"]
    assert pid != os.getpid() and pid == probe.pid
    assert f.message == "w scanned adapter" and f.details["sum"] == (16 + 8) * 2.0 and f.details["base"] == "base-info"
    assert probe.last == {"pid": pid}
    (g,) = probe(_view("second"), None)
    assert g.details["pid"] == pid  # the worker (and its model) is kept between scans
    probe.close()
    assert probe.pid is None
    (h,) = probe(_view(), None)  # a later scan starts a fresh one
    assert h.details["pid"] not in (pid, os.getpid())


def test_a_probe_that_raises_is_an_error_and_the_worker_goes_on(probe):
    (f,) = probe(_view(), None)
    with pytest.raises(ScanWorkerError, match="ValueError: planted failure"):
        probe(_view("bad"), None)
    (g,) = probe(_view(), None)
    assert g.details["pid"] == f.details["pid"]


def test_a_worker_killed_mid_scan_is_an_error_and_the_next_scan_starts_another(probe):
    (f,) = probe(_view(), None)
    pid = f.details["pid"]
    killer = threading.Timer(1.0, os.kill, (pid, signal.SIGKILL))
    killer.start()
    t0 = time.monotonic()
    with pytest.raises(ScanWorkerError, match="killed by signal 9"):
        probe(_view("slow"), None)
    assert time.monotonic() - t0 < 30
    (g,) = probe(_view(), None)
    assert g.details["pid"] != pid


def test_through_the_gate_a_dead_scan_is_a_fail_finding(tiny):
    """The gate fails closed on a worker error: not scanned means not served."""
    clean, base, _ = tiny
    probe = ProcessProbe(PidProbe, fail_on=str(clean))
    try:
        gate = VettingGate(base, behaviour=probe)
        with pytest.raises(ValueError, match="behaviour scan could not run .*ScanWorkerError"):
            gate.check("x", str(clean))
    finally:
        gate.close()
        assert probe.pid is None


def test_close_ends_a_scan_in_progress(probe):
    probe(_view(), None)
    errors = []

    def scan():
        try:
            probe(_view("slow"), None)
        except ScanWorkerError as e:
            errors.append(e)

    t = threading.Thread(target=scan)
    t.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    probe.close()
    t.join(30)
    assert not t.is_alive() and len(errors) == 1 and time.monotonic() - t0 < 15
    assert isinstance(errors[0], ScanStopped) and "server shutdown" in str(errors[0]) and probe.pid is None


def test_an_orphaned_worker_exits_with_its_parent(tmp_path):
    """A server killed with SIGKILL mid-scan runs no cleanup: its scan worker must not
    scan on (an idle one sees its pipe close; a busy one watches its parent's pid)."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from bastion.adapters.scan_worker import ProcessProbe
        from tests.adapters.test_scan_worker import PidProbe, _view
        if __name__ == "__main__":
            p = ProcessProbe(PidProbe, sleep_on="slow")
            (f,) = p(_view(), None)
            print(f.details["pid"], flush=True)
            p(_view("slow"), None)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        time.sleep(1.0)  # the second scan is under way
        assert _alive(worker)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
