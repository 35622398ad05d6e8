"""A two-node Ray cluster on loopback (two `ray start --block` processes, each in a
session of its own, so tearing down kills exactly what was started) and `bastion serve
--replicas N` as a subprocess joined to it, for tests/server/cluster/."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM to the process (ray start --block takes its node down with it, bastion
    serve deletes its app), then SIGKILL to whatever is left of its session."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: pgid == pid, only ours
    except ProcessLookupError:
        pass
    proc.wait(5)


@dataclass
class LoopbackRay:
    """Head + one worker node, `cpus` CPUs each, every port chosen free (two raylets on one
    host must not share the fixed defaults: dashboard agent, dashboard, client server)."""

    cpus: int = 1
    temp: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="bray", dir="/tmp"))  # short: socket paths
    nodes: list[subprocess.Popen] = field(default_factory=list)
    address: str = ""

    def start(self, timeout_s: float = 60.0) -> LoopbackRay:
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self._node(["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={self.temp}",
                    f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}",
                    "--min-worker-port=21000", "--max-worker-port=21999"], "head")
        self._wait_for(f"{self.temp}/head.log", "block forever", timeout_s)
        self._node([f"--address={self.address}", "--min-worker-port=22000", "--max-worker-port=22999"], "worker")
        self._wait_for(f"{self.temp}/worker.log", "block forever", timeout_s)
        return self

    def _node(self, args: list[str], name: str) -> None:
        log = open(f"{self.temp}/{name}.log", "w")
        common = ["--block", f"--num-cpus={self.cpus}", "--disable-usage-stats",
                  f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        self.nodes.append(subprocess.Popen([RAY, "start", *args, *common], stdout=log, stderr=subprocess.STDOUT,
                                           env=env, start_new_session=True))

    def _wait_for(self, path: str, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in Path(path).read_text(errors="replace"):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.nodes):
                raise RuntimeError(f"ray node did not start:\n{Path(path).read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        for proc in reversed(self.nodes):
            _stop(proc)
        shutil.rmtree(self.temp, ignore_errors=True)  # Ray's session logs and the front's


@dataclass
class ClusterFront:
    """`bastion serve --replicas N --ray-address ...` as a subprocess on a free port."""

    proc: subprocess.Popen
    log_path: str
    base_url: str = ""

    @classmethod
    def start(cls, address: str, args: list[str], log_dir: str, timeout_s: float = 180.0) -> ClusterFront:
        log_path = f"{log_dir}/front.log"
        log = open(log_path, "w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("BASTION_API_KEY", None)
        proc = subprocess.Popen([sys.executable, "-m", "bastion.cli", "serve", "--ray-address", address,
                                 "--port", "0", *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        front = cls(proc, log_path)
        deadline = time.monotonic() + timeout_s
        while True:
            m = re.search(r"serving on (http://[\d.]+:\d+)/v1", Path(log_path).read_text(errors="replace"))
            if m:
                front.base_url = m.group(1)
                return front
            if time.monotonic() > deadline or proc.poll() is not None:
                front.stop()
                raise RuntimeError(f"bastion serve did not start:\n{front.log()[-4000:]}")
            time.sleep(0.25)

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def stop(self) -> None:
        _stop(self.proc, grace_s=40.0)
