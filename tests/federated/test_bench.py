"""`bastion bench federated` bookkeeping on synthetic run summaries: gain kept, the
monotonicity verdicts, the markdown table, and run reuse across FedConfig additions."""

import math

from bastion.bench.federated import _gain_kept, _monotone, _same_config, markdown, synthetic_oracle
from bastion.federated.config import FedConfig


def _row(strategy, eps, ppl, exposure, auc, gap):
    return {"strategy": strategy, "epsilon": eps, "epsilon_prv_max": None if eps == "inf" else float(eps),
            "epsilon_rdp_max": None, "base_union_ppl": 60.0, "union_ppl": ppl,
            "per_owner_ppl": {"0": ppl, "1": ppl}, "base_per_owner_ppl": {"0": 60.0, "1": 60.0},
            "exposure_bits": exposure, "base_exposure_bits": 1.0, "canary_auc": auc,
            "canary_gap_increase_nats": gap, "upload_bytes": 1e5, "download_bytes": 1e5,
            "full_model_bytes": 5e8, "upload_reduction": 5000.0, "aggregation_error": None, "wall_s": 10.0}


ROWS = [_row("ffa", "inf", 40.0, 4.0, 0.95, 3.0), _row("ffa", "8", 45.0, 2.0, 0.8, 1.0),
        _row("ffa", "4", 50.0, 1.5, 0.7, 0.5), _row("ffa", "2", 55.0, 1.6, 0.6, 0.2)]


def test_gain_kept_is_relative_to_the_non_private_run():
    kept = _gain_kept(ROWS)["ffa"]
    assert math.isclose(kept["8"], 0.75) and math.isclose(kept["4"], 0.5) and math.isclose(kept["2"], 0.25)


def test_monotone_verdicts_follow_eps_order():
    mono = _monotone(list(reversed(ROWS)))["ffa"]
    assert mono["order"] == ["inf", "8", "4", "2"]
    assert mono["gap_monotone_non_increasing"] and mono["auc_monotone_non_increasing"]
    assert not mono["exposure_monotone_non_increasing"]  # 1.5 -> 1.6 at eps 2


def test_markdown_fills_every_column():
    table = markdown({"runs": ROWS, "gain_kept_vs_non_private": _gain_kept(ROWS), "oracle_synthetic": synthetic_oracle()})
    assert "| ffa | 8 |" in table and "75%" in table and "+1.000" in table and "n/a (n/a)" not in table.split("\n")[3]


def test_runs_are_reused_when_fedconfig_grew_a_field():
    cfg = FedConfig(model="tiny")
    old = {k: v for k, v in cfg.to_record().items() if k != "micro_batch"}  # a report from before the field
    assert _same_config({"config": old}, cfg)
    assert not _same_config({"config": {**old, "lr": 1.0}}, cfg)
    assert not _same_config({"config": {**old, "no_such_key": 1}}, cfg)


def test_leakage_standard_error_pools_owners_and_drops_are_in_se_units():
    from bastion.bench.federated import _drops_in_se
    from bastion.federated.server import pooled_se

    values = [1.0, 2.0, 3.0, 6.0]  # owner a: 1, 2; owner b: 3, 6
    groups = [(2, 1.5, 2.5), (2, 4.5, 22.5)]  # (count, mean, mean of squares)
    mean = sum(values) / 4
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    assert math.isclose(pooled_se(groups), sd / 2) and pooled_se([(1, 1.0, 1.0)]) is None
    rows = [{"exposure_bits": 4.0, "exposure_se": 0.3}, {"exposure_bits": 3.0, "exposure_se": 0.4},
            {"exposure_bits": 3.1, "exposure_se": 0.0}]
    drops = _drops_in_se(rows, "exposure_bits", "exposure_se")
    assert math.isclose(drops[0], 2.0) and drops[1] < 0
    assert _drops_in_se([{"exposure_bits": 1.0, "exposure_se": None}] * 2, "exposure_bits", "exposure_se") is None
