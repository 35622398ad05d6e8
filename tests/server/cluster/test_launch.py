"""What `bastion serve --replicas` asks Ray for (server/cluster/launch.py), and the CLI's
one-line error without the 'cluster' extra: no Ray started."""

from __future__ import annotations

import sys

import pytest

from bastion.cli import main
from bastion.config import ClusterConfig, Config, ModelConfig, SchedulerConfig
from bastion.server.cluster import launch


def test_without_ray_serve_is_one_line_naming_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    assert main(["serve", "--replicas", "2", "--port", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'bastion[cluster]'" in err and err.startswith("bastion serve: error:")


def test_fixed_replicas_and_autoscaling_bounds():
    pytest.importorskip("ray.serve")
    fixed = launch.deployment_options(Config(cluster=ClusterConfig(replicas=3)), threads=2)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"]["num_cpus"] == 2
    assert fixed["max_ongoing_requests"] == launch.capacity(Config()) + 8
    assert fixed["request_router_config"].request_router_class.endswith("AffinityRouter")
    auto = launch.deployment_options(Config(scheduler=SchedulerConfig(max_num_seqs=8),
                                            cluster=ClusterConfig(min_replicas=1, max_replicas=4)), threads=None)
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                                          "target_ongoing_requests": 8}
    assert "num_replicas" not in auto and auto["ray_actor_options"]["num_cpus"] == 1


def test_threads_per_replica(monkeypatch):
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 8)
    assert launch.replica_threads(Config(model=ModelConfig(threads=3), cluster=ClusterConfig(replicas=2)), True) == 3
    assert launch.replica_threads(Config(cluster=ClusterConfig(replicas=2)), local=True) == 4  # cores divided
    assert launch.replica_threads(Config(cluster=ClusterConfig(min_replicas=1, max_replicas=8)), local=True) == 1
    assert launch.replica_threads(Config(cluster=ClusterConfig(replicas=2, ray_address="h:6379")), local=False) is None
