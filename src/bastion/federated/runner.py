"""Run one federation in Flower's Simulation Runtime (Ray backend) from Python.

Each owner is a virtual SuperNode; `cfg.parallel` ClientApps run at once, each with
`cfg.threads` torch threads. The ServerApp runs in this process and writes the adapter and
report into `out_dir`; the returned dict is that report.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from bastion.federated.config import FedConfig


def run(cfg: FedConfig, out_dir: str | Path, *, progress: bool = True, verbose: bool = False) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Ray kills actors at 95% host memory by default, even when the memory is someone else's
    os.environ.setdefault("RAY_memory_usage_threshold", "0.98")
    from flwr.simulation import run_simulation

    from bastion.federated.client import client_app
    from bastion.federated.server import make_server_app

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / "training_report.json"
    if report_path.exists():
        report_path.unlink()  # never return a stale report if the run fails
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("flwr").setLevel(level)
    backend = {
        "client_resources": {"num_cpus": max(1, cfg.threads), "num_gpus": 0.0},
        "init_args": {"num_cpus": cfg.parallel * max(1, cfg.threads), "include_dashboard": False,
                      "logging_level": "error" if not verbose else "info", "log_to_driver": verbose},
    }
    try:
        run_simulation(server_app=make_server_app(cfg, str(out_dir), progress), client_app=client_app,
                       num_supernodes=cfg.clients, backend_config=backend, verbose_logging=verbose)
    except Exception as exc:  # noqa: BLE001 - the ServerApp thread's error, re-raised by Flower
        raise RuntimeError(f"the federation failed: {type(exc).__name__}: {exc}") from exc
    if not report_path.exists():
        raise RuntimeError("the federation did not finish (see the Flower log above; rerun with --verbose)")
    return json.loads(report_path.read_text())
