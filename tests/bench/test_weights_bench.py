"""bench weights (speed) and --quality on the embedded model, tiny settings: the harness
runs its child processes, reports the fields the docs table reads, and the quality
comparison finds the default path equal to the exact fp32 path."""

from __future__ import annotations

from bastion.bench.weights import WeightsBenchConfig, run_weights, table
from bastion.bench.weights_quality import QualityConfig, quality_table, run_quality
from bastion.engine.models.loader import embedded_model_path


def test_speed_rows_have_every_number():
    model = str(embedded_model_path())
    res = run_weights([model], WeightsBenchConfig(prompt_len=16, new_tokens=4, batch=2, runs=1), engines=("bastion",))
    (row,) = res["rows"]
    assert "error" not in row, row
    for key in ("prefill_tok_s", "decode_b1_tok_s", "decode_b2_tok_s", "peak_rss_bytes", "weight_bytes", "rss_budget_bytes"):
        assert row[key] > 0, key
    assert "| bastion |" in table(res)


def test_quality_default_path_equals_exact_fp32():
    model = str(embedded_model_path())
    res = run_quality([model], QualityConfig(windows=1, window=48, new_tokens=4), engines=("bastion", "bastion-fp32"))
    ours, exact = res["rows"]
    assert "error" not in ours and "error" not in exact, res["rows"]
    assert abs(ours["ppl"] - exact["ppl"]) / exact["ppl"] < 1e-3
    assert ours["top1_vs_bastion-fp32"] == 1.0
    assert "| bastion-fp32 |" in quality_table(res)
