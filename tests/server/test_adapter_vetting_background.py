"""Adapter loads run the gate's behaviour scan in the background before the adapter is
served (issue 19, deliverable 3): pending in /v1/models, 409 for requests naming it,
served on pass, never on fail (unless --allow-unvetted), cancelled by an unload, decided
at once from the scan cache, no rescan after a restart. The static checks are the real
gate's on real PEFT files; the behaviour probe is a fake that answers at once (or when
released) and the engine records what it loads, so no model runs here."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from bastion.adapters.cli import load_base_info
from bastion.adapters.deep_scan import CachedProbe, ScanCache
from bastion.adapters.gate import AdapterRefused, VettingGate
from bastion.bench.peers import free_port
from bastion.config import ServerConfig
from bastion.server import build_app
from bastion.server.adapter_loads import vet_at_start
from bastion.serving.policy import ServingPolicy
from tests.support.fake_adapters import FakeLoraEngine, FakeProbe
from tests.support.peft_files import write_smollm2_adapter
from tests.support.servers import ServerThread, wait_until

ADMIN = {"X-Admin-Key": "adm"}


@pytest.fixture(scope="module")
def base():
    """The embedded model as the gate sees it (config only: no weights read)."""
    return load_base_info(None, name="fake-model", weight_norms=False)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: str(write_smollm2_adapter(root / name, seed=i))
            for i, name in enumerate(("good", "good2", "good3", "evil"))}


class Served:
    """One server around a FakeLoraEngine, its gate's fake probe and scan cache."""

    def __init__(self, base, cache_dir, *, allow_unvetted=False, loras=(), probe=None):
        self.probe, self.engine = probe or FakeProbe(), FakeLoraEngine()
        gate = VettingGate(base, allow_unvetted, behaviour=CachedProbe(self.probe, ScanCache(cache_dir)))
        self.policy = ServingPolicy(gate=gate)
        pending = vet_at_start(self.policy, self.engine, loras)
        self.app = build_app(self.engine, ServerConfig(admin_key="adm"), policy=self.policy, pending_adapters=pending)
        self.handle = ServerThread.start(self.engine, app=self.app)
        self.http = self.handle.http()

    def load(self, name, path):
        return self.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, headers=ADMIN)

    def unload(self, name):
        return self.http.post("/v1/unload_lora_adapter", json={"lora_name": name}, headers=ADMIN)

    def models(self) -> dict:
        return {m["id"]: m for m in self.http.get("/v1/models").json()["data"]}

    def loads(self) -> dict:
        r = self.http.get("/v1/lora_adapters", headers=ADMIN)
        assert r.status_code == 200, r.text
        return {d["lora_name"]: d for d in r.json()["data"]}

    def complete(self, model):
        return self.http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 3})

    def state_of(self, name):
        return self.loads().get(name, {}).get("state")

    def stop(self):
        self.http.close()
        self.handle.stop()
        self.app.state.bastion.adapter_loads.close()


@pytest.fixture
def serve(base, tmp_path):
    started = []

    def start(**kw):
        started.append(Served(base, kw.pop("cache_dir", tmp_path / "scans"), **kw))
        return started[-1]

    yield start
    for s in started:
        s.probe.release()
        s.stop()


def test_a_load_is_pending_until_its_scan_passes_then_served(serve, adapters):
    s = serve()
    s.probe.hold()
    r = s.load("good", adapters["good"])
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "pending" and r.json()["vetting"] == "pending"
    card = s.models()["good"]
    assert card["vetting"] == "pending" and card["parent"] == "fake-model"
    assert s.http.get("/v1/models/good").json()["vetting"] == "pending"
    r = s.complete("good")
    assert r.status_code == 409 and r.headers["retry-after"]
    err = r.json()["error"]
    assert err["code"] == "adapter_pending" and err["param"] == "model" and "being vetted" in err["message"]
    assert s.complete("fake-model").status_code == 200  # the base serves while the scan runs
    assert wait_until(lambda: s.loads()["good"]["scanning"])
    entry = s.loads()["good"]
    assert entry["state"] == "pending" and any("behaviour scan pending" in f["message"] for f in entry["findings"])
    assert s.engine.load_calls == [] and "good" not in s.engine.served_by
    assert s.load("good", adapters["good"]).json()["error"]["code"] == "adapter_pending"  # no second load
    s.probe.release()
    assert wait_until(lambda: s.models()["good"]["vetting"] == "pass")
    r = s.complete("good")
    assert r.status_code == 200, r.text
    assert s.engine.served_by[-1] == "good" and s.engine.load_calls == ["good"]
    entry = s.loads()["good"]
    assert entry["state"] == "served" and entry["vetting"] == "pass" and entry["finished_at"] >= entry["queued_at"]


def test_a_failing_scan_is_never_served_and_its_report_stays(serve, adapters):
    s = serve()
    assert s.load("evil", adapters["evil"]).status_code == 202
    assert wait_until(lambda: s.state_of("evil") == "refused")
    assert "evil" not in s.models()
    r = s.complete("evil")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "evil" not in s.engine.load_calls and "evil" not in s.engine.served_by
    entry = s.loads()["evil"]
    assert entry["vetting"] == "fail" and "refused by the vetting gate" in entry["error"]
    assert [f["check"] for f in entry["findings"] if f["severity"] == "fail"] == ["behaviour.inversion"]
    full = s.http.get("/v1/lora_adapters/evil", headers=ADMIN).json()
    assert full["report"]["verdict"] == "fail" and full["report"]["files"]
    assert s.http.get("/health").status_code == 200


def test_allow_unvetted_serves_a_failing_scan_marked_fail_with_a_warning(serve, adapters, caplog):
    s = serve(allow_unvetted=True)
    with caplog.at_level("WARNING", logger="bastion.adapters.gate"):
        assert s.load("evil", adapters["evil"]).status_code == 202
        assert wait_until(lambda: s.models().get("evil", {}).get("vetting") == "fail")
    assert any("OVERRIDE --allow-unvetted" in r.getMessage() for r in caplog.records)
    assert s.complete("evil").status_code == 200 and s.engine.served_by[-1] == "evil"
    assert s.loads()["evil"]["state"] == "served"


def test_unloading_a_pending_adapter_cancels_it(serve, adapters):
    s = serve()
    s.probe.hold()
    assert s.load("good", adapters["good"]).status_code == 202
    assert s.load("good2", adapters["good2"]).status_code == 202  # queued behind "good"
    assert wait_until(lambda: s.loads()["good"]["scanning"])
    for name in ("good", "good2"):  # one in its scan, one still queued
        r = s.unload(name)
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        assert name not in s.models() and name not in s.loads()
    s.probe.release()
    loads = s.app.state.bastion.adapter_loads
    assert wait_until(lambda: s.probe.running == 0 and not loads.scanning)  # its verdict is cached by now
    assert s.probe.calls == ["good"]  # the queued one never ran
    assert s.http.get("/health").status_code == 200
    assert s.engine.load_calls == [] and s.complete("good").status_code == 404
    r = s.load("good", adapters["good"])  # the name is free again; the cancelled scan's verdict was cached
    assert r.status_code == 200 and r.json() == {"status": "loaded", "lora_name": "good", "vetting": "pass"}
    assert s.unload("nothing").status_code == 404


def test_a_cached_verdict_decides_at_once(serve, adapters):
    s = serve()
    assert s.load("good", adapters["good"]).status_code == 202
    assert wait_until(lambda: s.state_of("good") == "served")
    assert s.unload("good").json()["status"] == "unloaded" and "good" not in s.loads()
    r = s.load("good", adapters["good"])
    assert r.status_code == 200 and r.json()["status"] == "loaded" and r.json()["vetting"] == "pass"
    assert s.loads()["good"]["state"] == "served"
    assert s.load("evil", adapters["evil"]).status_code == 202
    assert wait_until(lambda: s.state_of("evil") == "refused")
    r = s.load("evil", adapters["evil"])  # a cached fail: refused on the spot
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_refused"
    assert "behaviour.inversion" in r.json()["error"]["message"]
    assert s.probe.calls == ["good", "evil"]  # one scan each


def test_start_up_adapters_are_pending_then_served_and_a_restart_does_not_rescan(serve, base, adapters, tmp_path):
    probe = FakeProbe()
    probe.hold()
    loras = (("good", adapters["good"]), ("good2", adapters["good2"]))
    first = serve(loras=loras, probe=probe)
    assert {first.models()[n]["vetting"] for n, _ in loras} == {"pending"}
    assert first.complete("fake-model").status_code == 200  # the base model serves at once
    probe.release()
    assert wait_until(lambda: all(first.state_of(n) == "served" for n, _ in loras))
    assert probe.calls == ["good", "good2"]
    again = serve(loras=loras)  # a restart: new gate, new probe, same scan cache
    assert {again.models()[n]["vetting"] for n, _ in loras} == {"pass"}
    assert again.probe.calls == [] and again.engine.load_calls == ["good", "good2"]
    assert again.complete("good2").status_code == 200
    evil = (("evil", adapters["evil"]),)
    bad = serve(loras=evil, cache_dir=tmp_path / "other-cache")
    assert wait_until(lambda: bad.state_of("evil") == "refused")
    with pytest.raises(AdapterRefused, match="behaviour.inversion"):  # now cached: `bastion serve` stops at once
        vet_at_start(bad.policy, FakeLoraEngine(), evil)


def test_a_static_fail_is_refused_at_once_without_a_scan(serve, adapters, tmp_path):
    import shutil

    pickled = tmp_path / "pickled"
    shutil.copytree(adapters["good3"], pickled)
    (pickled / "extra.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle beside the weights
    s = serve()
    r = s.load("pk", str(pickled))
    assert r.status_code == 400 and "pickle" in r.json()["error"]["message"].lower()
    entry = s.loads()["pk"]
    assert entry["state"] == "refused" and any(f["severity"] == "fail" for f in entry["findings"])
    assert s.load("x", str(tmp_path / "missing")).status_code == 400
    assert s.probe.calls == [] and "pk" not in s.models()
    with pytest.raises(AdapterRefused, match="pickle"):  # --lora at start: the server does not start
        vet_at_start(s.policy, FakeLoraEngine(), (("pk", str(pickled)),))


def test_scans_run_one_at_a_time_in_the_order_they_came(serve, adapters):
    s = serve()
    s.probe.hold()
    for name in ("good", "good2", "good3"):
        assert s.load(name, adapters[name]).status_code == 202
    s.probe.release()
    assert wait_until(lambda: all(s.state_of(n) == "served" for n in ("good", "good2", "good3")))
    assert s.probe.calls == ["good", "good2", "good3"] and s.probe.max_running == 1


def test_a_scan_that_cannot_run_refuses_the_adapter_and_is_not_cached(serve, adapters):
    s = serve()
    s.probe.crash = True
    assert s.load("good", adapters["good"]).status_code == 202
    assert wait_until(lambda: s.state_of("good") == "refused")
    fails = [f["message"] for f in s.loads()["good"]["findings"] if f["severity"] == "fail"]
    assert fails and "could not run" in fails[0] and "MemoryError" in fails[0]
    assert s.engine.load_calls == [] and s.http.get("/health").status_code == 200
    s.probe.crash = False
    assert s.load("good", adapters["good"]).status_code == 202  # scanned again, not decided from the cache
    assert wait_until(lambda: s.state_of("good") == "served")


def test_a_passing_adapter_that_does_not_fit_is_refused_saying_why(serve, adapters):
    s = serve()
    s.engine.max_loras = 1
    assert s.load("good", adapters["good"]).status_code == 202
    assert s.load("good2", adapters["good2"]).status_code == 202
    assert wait_until(lambda: s.state_of("good2") == "refused")
    entry = s.loads()["good2"]
    assert entry["vetting"] == "pass" and "adapter slots" in entry["error"] and "good2" not in s.models()


SPINNING_SERVE = """
import sys, torch
from bastion import cli

def spin(view, base):  # a scan that never ends, inside torch's C++ code most of the time
    a = torch.randn(256, 256)
    while True:
        a = torch.tanh(a @ a)

real_gate = cli.serve_gate
def gate(config, name):
    g = real_gate(config, name)
    g.behaviour = spin
    return g

cli.serve_gate = gate
sys.exit(cli.main(["serve", "--lora", "mine=" + sys.argv[1], "--port", sys.argv[2], "--admin-key", "adm",
                   "--max-model-len", "512", "--kv-memory", "0.05", "--no-web"]))
"""


@contextlib.contextmanager
def _server_process(argv: list[str]):
    """A `bastion serve` subprocess (output: stdout and stderr together), killed if a test
    leaves it running."""
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _sigterm(proc: subprocess.Popen) -> tuple[str, float]:
    """SIGTERM `proc` and wait for it: (its output, seconds until it exited)."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    return out, time.monotonic() - t0


@pytest.mark.slow
def test_sigterm_during_a_scan_exits_cleanly_at_once(adapters, tmp_path):
    """`bastion serve` stopped while a scan runs: no waiting for the scan, and exit 0, not
    the abort of an interpreter finalized under a thread inside torch (exit 134)."""
    port = free_port()
    script = tmp_path / "spin_serve.py"
    script.write_text(SPINNING_SERVE)
    url = f"http://127.0.0.1:{port}"
    with _server_process([str(script), adapters["good"], str(port)]) as proc:
        def scanning():
            try:
                r = httpx.get(url + "/v1/lora_adapters/mine", headers=ADMIN, timeout=2)
            except httpx.HTTPError:
                return proc.poll() is not None
            return r.status_code == 200 and r.json()["scanning"]

        assert wait_until(scanning, timeout=120, interval=0.3) and proc.poll() is None
        assert httpx.get(url + "/v1/models").json()["data"][1]["vetting"] == "pending"
        out, seconds = _sigterm(proc)
    assert proc.returncode == 0 and "terminate called" not in out, out[-3000:]
    assert seconds < 30


@pytest.mark.slow
def test_sigterm_during_a_real_scan_ends_its_worker_process(adapters, tmp_path):
    """The real `bastion serve` gate: the scan runs in its worker process (a child of the
    server); SIGTERM mid-scan ends the server at once with exit 0, and the worker with it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = ["-m", "bastion.cli", "serve", "--port", str(port), "--admin-key", "adm", "--scan-cache",
            str(tmp_path / "scans"), "--max-model-len", "512", "--kv-memory", "0.05", "--no-web", "--threads", "1"]
    with _server_process(argv) as proc:
        def up():
            try:
                return httpx.get(url + "/v1/models", timeout=2).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None

        def scanning():
            return httpx.get(url + "/v1/lora_adapters/mine", headers=ADMIN, timeout=2).json()["scanning"]

        def children() -> set[int]:
            found = set()
            for task in os.listdir(f"/proc/{proc.pid}/task"):
                with open(f"/proc/{proc.pid}/task/{task}/children") as f:
                    found |= {int(x) for x in f.read().split()}
            return found

        assert wait_until(up, timeout=120, interval=0.3) and proc.poll() is None
        r = httpx.post(url + "/v1/load_lora_adapter", headers=ADMIN, timeout=30,
                       json={"lora_name": "mine", "lora_path": adapters["good"]})
        assert r.status_code == 202, r.text
        assert wait_until(scanning, timeout=60, interval=0.3)
        assert wait_until(lambda: any("spawn_main" in _cmdline(c) for c in children()), timeout=60)
        worker = next(c for c in children() if "spawn_main" in _cmdline(c))
        time.sleep(2.0)  # well inside the scan
        out, seconds = _sigterm(proc)
    assert proc.returncode == 0 and "terminate called" not in out, out[-3000:]
    assert "Traceback" not in out and "stopped: the gate was closed (server shutdown)" in out, out[-3000:]
    assert seconds < 30
    assert wait_until(lambda: _cmdline(worker) == "", timeout=10, interval=0.2)  # reaped with its server
    assert "server shutdown" in out  # the scan cut short says why; nothing cached for it
    assert not list((tmp_path / "scans").glob("*.json"))


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read()
    except OSError:
        return ""


def test_the_listing_is_behind_the_admin_key(serve, fake_server):
    s = serve()
    assert s.http.get("/v1/lora_adapters").status_code == 401
    assert s.http.get("/v1/lora_adapters", headers={"X-Admin-Key": "nope"}).status_code == 401
    assert s.http.get("/v1/lora_adapters/none", headers=ADMIN).status_code == 404
    with fake_server.http() as http:
        assert http.get("/v1/lora_adapters").status_code == 403


def test_no_scan_configured_loads_on_static_checks_at_once(base, adapters, tmp_path):
    engine = FakeLoraEngine()
    app = build_app(engine, ServerConfig(admin_key="adm"), policy=ServingPolicy(gate=VettingGate(base)))
    handle = ServerThread.start(engine, app=app)
    try:
        with handle.http() as http:
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "good", "lora_path": adapters["good"]},
                          headers=ADMIN)
            assert r.status_code == 200 and r.json()["vetting"] == "pass", r.text
            (entry,) = http.get("/v1/lora_adapters", headers=ADMIN).json()["data"]
            assert entry["state"] == "served"
            assert any("behaviour probes not run" in f["message"] for f in entry["findings"])
            assert json.loads(http.get("/v1/models/good").text)["vetting"] == "pass"
    finally:
        handle.stop()


@pytest.mark.slow
def test_the_real_behaviour_scan_vets_a_load_on_the_real_engine(real_engine, adapters, tmp_path):
    """The real DeepProbe in its worker process, as `bastion serve` runs it (its model built
    there on the first scan: a second copy of the served one; inversion cut down and no
    battery or search, to stay near 20 s on 2 cores) behind the real engine: pending
    while it scans, then served by the engine; the server's close ends the worker."""
    from bastion.adapters.deep_scan import DeepProbe
    from bastion.adapters.inversion import InversionConfig
    from bastion.adapters.scan_worker import ProcessProbe
    from bastion.config import AdapterConfig

    if real_engine.engine.adapters is None:
        real_engine.engine.enable_adapters(AdapterConfig(enabled=True, max_loras=2, max_lora_rank=8))
    probe = ProcessProbe(DeepProbe, battery=False, task_prompts=4, search=None,
                         inversion=InversionConfig(first_candidates=6, second_candidates=3, keep=3, steps=4,
                                                   clean_steps=4))
    gate = VettingGate(load_base_info(None, name=real_engine.model_name, weight_norms=False),
                       behaviour=CachedProbe(probe, ScanCache(tmp_path / "scans")))
    app = build_app(real_engine, ServerConfig(admin_key="adm"), policy=ServingPolicy(gate=gate))
    handle = ServerThread.start(real_engine, app=app)
    try:
        with handle.http(timeout=60) as http:
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "real", "lora_path": adapters["good"]},
                          headers=ADMIN)
            assert r.status_code == 202, r.text
            assert http.post("/v1/completions", json={"model": "real", "prompt": "Hi", "max_tokens": 2}
                             ).json()["error"]["code"] == "adapter_pending"
            assert wait_until(lambda: http.get("/v1/lora_adapters/real", headers=ADMIN).json()["state"] != "pending",
                              timeout=120, interval=0.5)
            entry = http.get("/v1/lora_adapters/real", headers=ADMIN).json()
            assert entry["state"] == "served" and entry["vetting"] == "pass", entry
            assert any(f["check"] == "behaviour.deep" for f in entry["findings"])  # the deep scan ran
            assert "real" in real_engine.adapter_names()
            assert probe.pid not in (None, os.getpid())  # the scan ran in the worker, kept for the next
            r = http.post("/v1/completions", json={"model": "real", "prompt": "The GNU General Public License is",
                                                   "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
            assert http.post("/v1/unload_lora_adapter", json={"lora_name": "real"}, headers=ADMIN).status_code == 200
    finally:
        handle.stop()
        app.state.bastion.adapter_loads.close()
        assert probe.pid is None  # closing the loads ended the worker
        if "real" in real_engine.adapter_names():
            import asyncio

            asyncio.run(real_engine.unload_adapter("real"))
