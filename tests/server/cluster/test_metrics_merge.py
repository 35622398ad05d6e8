"""The front's /metrics merge (server/cluster/metrics_merge.py): no Ray."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bastion.server.cluster.metrics_merge import FrontMetrics, merge


def _exposition(requests: int) -> str:
    registry = CollectorRegistry()
    c = Counter("bastion_requests", "requests", ["status"], registry=registry)
    c.labels(status="200").inc(requests)
    h = Histogram("bastion_ttft_seconds", "ttft", registry=registry, buckets=(0.1, 1.0))
    h.observe(0.05)
    return generate_latest(registry).decode()


def test_each_replica_is_a_label_and_the_families_stay_whole():
    text = merge([("r1", _exposition(3)), ("r2", _exposition(5))]) + FrontMetrics().render().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}  # parses: valid exposition
    totals = {s.labels["replica"]: s.value for s in families["bastion_requests"].samples
              if s.name == "bastion_requests_total"}
    assert totals == {"r1": 3.0, "r2": 5.0}
    buckets = [s for s in families["bastion_ttft_seconds"].samples if s.name == "bastion_ttft_seconds_bucket"]
    assert {s.labels["replica"] for s in buckets} == {"r1", "r2"} and all("le" in s.labels for s in buckets)
    assert text.count("# TYPE bastion_requests_total") + text.count("# TYPE bastion_requests counter") == 1
    assert "bastion_cluster_retries" in families


def test_nothing_to_merge_is_empty():
    assert merge([]) == ""
