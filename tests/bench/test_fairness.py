"""`bastion bench fairness` without a server: its config checks, and the table and plot
drawn from a result of the shape run_fairness writes (the run itself starts servers and
takes minutes: docs/BENCHMARKS.md has its numbers)."""

from __future__ import annotations

import pytest

from bastion.bench.fairness import FairnessConfig, fairness_table, plot_fairness


def fake_result() -> dict:
    def run(alone, flood):
        return {"alone": {"ttft_ms": alone, "ttft_p50_ms": alone[0], "ttft_p99_ms": max(alone)},
                "flood": {"ttft_ms": flood, "ttft_p50_ms": flood[0], "ttft_p99_ms": max(flood)},
                "flood_output_tok_s": 100.0, "p99_ratio": max(flood) / max(alone)}

    cfg = FairnessConfig(repeats=1)
    from dataclasses import asdict

    return {"config": asdict(cfg), "policies": {
        "fcfs": {"runs": [run([40, 50], [900, 4000])],
                 "median": {"alone_p50": 40, "alone_p99": 50, "flood_p50": 900, "flood_p99": 4000, "p99_ratio": 80.0,
                            "flood_tok_s": 100.0}},
        "fair": {"runs": [run([40, 50], [60, 90])],
                 "median": {"alone_p50": 40, "alone_p99": 50, "flood_p50": 60, "flood_p99": 90, "p99_ratio": 1.8,
                            "flood_tok_s": 95.0}}}}


def test_table_and_plot(tmp_path):
    table = fairness_table(fake_result())
    assert "| fcfs | 40 | 50 | 900 | 4000 | 80.00x | 100 |" in table
    assert "| fair | 40 | 50 | 60 | 90 | 1.80x | 95 |" in table
    png = plot_fairness(fake_result(), tmp_path / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_is_checked():
    with pytest.raises(ValueError, match="policies"):
        FairnessConfig(policies=("random",))
    with pytest.raises(ValueError, match="quiet_requests"):
        FairnessConfig(quiet_requests=0)
