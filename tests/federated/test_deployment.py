"""The same apps against a real SuperLink + 2 SuperNodes on loopback, driven by `flwr run`
(tiny config from src/bastion/federated/flwr_app/pyproject.toml). ~1-2 min: marked slow."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[2] / "src" / "bastion" / "federated" / "flwr_app"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flower-superlink", path=str(BIN)) is None, reason="flwr CLI not installed")
def test_superlink_supernodes_loopback(tmp_path):
    link, node_ports = _free_port(), [_free_port(), _free_port()]
    home = tmp_path / "home"
    (home / ".flwr").mkdir(parents=True)
    (home / ".flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n[superlink.loopback]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([BIN / "flower-superlink", "--insecure", "--database", ":flwr-in-memory:",
                               "--host", "127.0.0.1", "--port", str(link), "--disable-runtime-dependency-installation"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        time.sleep(3)
        for pid, port in enumerate(node_ports):
            procs.append(subprocess.Popen(
                [BIN / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(port),
                 "--node-config", f"partition-id={pid} num-partitions=2"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        out = tmp_path / "adapter"
        run = subprocess.run([BIN / "flwr", "run", str(APP), "loopback", "--stream",
                              "--run-config", f'out-dir="{out}"'], env=env, capture_output=True, text=True,
                             timeout=400)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        report = json.loads((out / "training_report.json").read_text())
        assert set(report["privacy"]["per_owner"]) == {"0", "1"}
        assert (out / "adapter_model.safetensors").exists()
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
