"""One request's failure is that request's alone, and a failed engine is visible (issue
16): over real HTTP, a request the engine fails gets a 500 (or an error event) while a
bystander's stream goes on; a dead or wedged engine turns /health 503; `bastion serve`
exits non-zero when its engine dies; admin loads and scans of devices and FIFOs fail
at once instead of hanging."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from bastion.bench.faults import POISON_SEED, poison_sampler
from bastion.config import ServerConfig

from tests.support.servers import ServerThread, wait_until
from tests.support.fake_engine import ByteTokenizer

CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
@pytest.fixture
def poisoned(real_server):
    engine = real_server.engine.engine
    poison_sampler(engine)
    yield real_server
    engine.sampler = engine.sampler.inner


def _stream_text(http: httpx.Client, body: dict) -> tuple[str, list[dict]]:
    text, events = "", []
    with http.stream("POST", COMPLETIONS_URL, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ev = json.loads(line[6:])
                events.append(ev)
                if "choices" in ev and ev["choices"]:
                    text += ev["choices"][0]["text"]
    return text, events


@pytest.mark.slow
def test_a_poisoned_request_fails_alone_while_a_bystander_streams(poisoned):
    bystander = {"prompt": "The GNU General Public License is", "max_tokens": 48, "temperature": 0,
                 "ignore_eos": True}
    with poisoned.http() as http:
        expected, _ = _stream_text(http, bystander)

        def poison(i):
            body = {"prompt": f"Poison {i}", "max_tokens": 8, "temperature": 0.7, "seed": POISON_SEED}
            if i % 2:
                return _stream_text(http, body)[1]
            return http.post(COMPLETIONS_URL, json=body)

        with ThreadPoolExecutor(5) as pool:
            side = pool.submit(_stream_text, http, bystander)
            results = list(pool.map(poison, range(6)))
            got, _ = side.result()
    assert got == expected
    for i, res in enumerate(results):
        if i % 2:  # streamed: two tokens, then an error event for this request, then [DONE]
            assert any(ev.get("error", {}).get("code") == "internal_error" for ev in res), res
            assert sum(len(ev.get("choices", ())) for ev in res) == 2
        else:
            assert res.status_code == 500 and res.json()["error"]["code"] == "internal_error", res.text
            assert "IndexError" not in res.text  # details stay in the server log
    with poisoned.http() as http:
        assert http.get("/health").status_code == 200
    stats = poisoned.engine.stats
    assert wait_until(lambda: stats().num_running == 0 and stats().kv_blocks_used == 0), stats()


# ------------------------------------------------------------------ 2. engine death is visible
class _TinyTokenizer(ByteTokenizer):
    """Bytes for the tiny model's 512 ids (ids past the bytes wrap around)."""

    def decode(self, ids, skip_special_tokens=False, **_):
        return super().decode([i if i < 3 else 3 + (i - 3) % 256 for i in ids], skip_special_tokens)


@pytest.fixture
def tiny_async(tiny_llm_engine):
    from bastion.serving.async_engine import AsyncEngine

    engine = AsyncEngine(tiny_llm_engine(eos_token_id=ByteTokenizer.eos_token_id), _TinyTokenizer(), "tiny")
    yield engine
    if engine.is_running:
        import asyncio

        asyncio.run(engine.shutdown(grace_s=0))


def test_health_is_503_when_the_engine_loop_dies(tiny_async):
    engine = tiny_async
    srv = ServerThread.start(engine)
    try:
        with srv.http() as http:
            assert http.get("/health").status_code == 200
            engine.engine.scheduler.schedule = lambda: (_ for _ in ()).throw(RuntimeError("scheduler bug"))
            r = http.post(COMPLETIONS_URL, json={"prompt": "hi", "max_tokens": 3})
            assert r.status_code == 503, r.text
            assert wait_until(lambda: engine.failure is not None)
            r = http.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "unhealthy", r.text
            assert "crashed" in r.json()["reason"]
    finally:
        srv.stop()


def test_health_is_503_while_a_step_is_wedged(tiny_async):
    engine = tiny_async
    step = engine.engine.step

    def slow_step():
        time.sleep(2.0)
        return step()

    engine.engine.step = slow_step
    srv = ServerThread.start(engine, ServerConfig(engine_stall_s=0.5))
    try:
        with srv.http() as http:
            assert http.get("/health").status_code == 200
            done = []
            threading.Thread(target=lambda: done.append(http.post(COMPLETIONS_URL, json={
                "prompt": "hi", "max_tokens": 1}).status_code), daemon=True).start()
            assert wait_until(lambda: httpx.get(srv.base_url + "/health").status_code == 503, timeout=5)
            assert "step running" in httpx.get(srv.base_url + "/health").json()["reason"]
            assert wait_until(lambda: done == [200], timeout=10)
            assert http.get("/health").status_code == 200
    finally:
        srv.stop()


_DYING_SERVER = textwrap.dedent("""
    import sys
    from bastion.engine import scheduler
    schedule = scheduler.Scheduler.schedule
    def dying(self):
        if any(r.params.seed == 13 for r in self.waiting):
            raise RuntimeError("a scheduler bug")
        return schedule(self)
    scheduler.Scheduler.schedule = dying
    from bastion.cli import main
    sys.exit(main(["serve", "--port", sys.argv[1], "--max-model-len", "512", "--kv-memory", "0.05"]))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_bastion_serve_exits_non_zero_when_its_engine_dies(tmp_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", _DYING_SERVER, str(port)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        base = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(base + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(up, timeout=120), proc.stderr.read() if proc.poll() is not None else "no start"
        httpx.post(base + COMPLETIONS_URL, json={"prompt": "hi", "max_tokens": 3, "seed": 13}, timeout=30)
        rc = proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc != 0, err
    assert "engine loop crashed" in err and "RuntimeError" in err


# ------------------------------------------------------------------ 4. devices and FIFOs
@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def _adapter_dir_with(tmp_path, name: str, target) -> str:
    d = tmp_path / f"ad{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    os.symlink(target, d / name)
    return str(d)


@pytest.mark.slow
def test_admin_loads_of_devices_and_fifos_fail_fast(real_engine, tmp_path, fifo):
    from bastion.adapters.gate import VettingGate
    from bastion.config import AdapterConfig
    from bastion.serving.policy import ServingPolicy

    if real_engine.engine.adapters is None:
        real_engine.engine.enable_adapters(AdapterConfig(enabled=True, max_loras=2, max_lora_rank=8))
    gate = VettingGate.for_model(None, served_name=real_engine.model_name)
    srv = ServerThread.start(real_engine, ServerConfig(admin_key="adm"), policy=ServingPolicy(gate=gate))
    paths = ["/dev/zero", str(fifo), _adapter_dir_with(tmp_path, "adapter_model.safetensors", "/dev/zero"),
             _adapter_dir_with(tmp_path, "adapter_model.safetensors", fifo),
             _adapter_dir_with(tmp_path, "README.md", "/dev/urandom")]
    try:
        with srv.http(timeout=30) as http:
            for i, path in enumerate(paths):
                t0 = time.monotonic()
                r = http.post("/v1/load_lora_adapter", json={"lora_name": f"x{i}", "lora_path": path},
                              headers={"X-Admin-Key": "adm"})
                assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_refused", (path, r.text)
                assert time.monotonic() - t0 < 10, path
            assert http.get("/health").status_code == 200
            assert "x0" not in {m["id"] for m in http.get("/v1/models").json()["data"]}
    finally:
        srv.stop()


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_scan_of_a_device_or_fifo_fails_fast(target, fifo):
    path = str(fifo) if target == "fifo" else target
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "bastion.cli", "scan", path, "--no-behaviour", "--no-base-weights"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode != 0 and "not a regular" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 60


def test_scanner_reads_no_device_inside_an_adapter(tmp_path, fifo):
    from bastion.adapters.scanner import scan_adapter

    for target in ("/dev/zero", fifo):
        report = scan_adapter(_adapter_dir_with(tmp_path, "tokenizer.json", target))
        assert report.verdict == "fail"
        assert any(f.check == "artifact.symlink" and f.severity == "fail" for f in report.findings)


def test_sigterm_stops_a_server_that_was_asked_to_read_a_fifo(tmp_path, fifo):
    """The loader never blocks on the FIFO, so a SIGTERM right after the request stops
    the process gracefully (with the old code, only SIGKILL could)."""
    script = textwrap.dedent(f"""
        import sys
        from bastion.safe_io import read_regular
        try:
            read_regular({str(fifo)!r}, 1000)
        except OSError as e:
            print("refused:", e, flush=True)
        import time; time.sleep(30)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) != 0
    assert line.startswith("refused:") and "not a regular file" in line
