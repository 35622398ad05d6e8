"""`bastion bench lora` end to end at a toy size on the embedded model (no timing
assertions: only that it runs both modes, pairs them and writes its report)."""

from __future__ import annotations

import json

import pytest

from bastion.bench import cli
from bastion.bench.lora import LoraBenchConfig


def test_lora_bench_writes_paired_ratios(tmp_path):
    out = tmp_path / "lora"
    rc = cli.main(["lora", "--batch", "2", "--rank", "2", "--prompt-len", "16", "--new-tokens", "3",
                   "--runs", "2", "--threads", "1", "--targets", "q_proj,down_proj", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "lora.json").read_text())
    assert len(result["paired_ratios"]) == 2 and all(r > 0 for r in result["paired_ratios"])
    assert result["lora_over_base"] == pytest.approx(sorted(result["paired_ratios"])[0] / 2
                                                     + sorted(result["paired_ratios"])[1] / 2)
    assert "median of paired runs" in (out / "lora.md").read_text()
    assert (out / "lora.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("kw, msg", [({"targets": ("qkv",)}, "targets"), ({"new_tokens": 1}, "new_tokens"),
                                     ({"runs": 0}, "runs")])
def test_lora_bench_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        LoraBenchConfig(**kw)
