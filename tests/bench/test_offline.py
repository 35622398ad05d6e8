"""The offline benchmark harness with stub engines (no model, no timing assertions)."""

from __future__ import annotations

import json

import pytest

from bastion.bench import cli, offline, plots

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class StubEngine:
    """Echoes a deterministic continuation; `diverge_at` makes it disagree from there on."""

    def __init__(self, name: str, diverge_at: int | None = None) -> None:
        self.name = name
        self.diverge_at = diverge_at
        self.calls: list[tuple[int, int]] = []  # (batch size, max_tokens)

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        self.calls.append((len(prompts), max_tokens))
        out = []
        for p in prompts:
            toks = [(p[-1] + i) % 97 for i in range(max_tokens)]
            if self.diverge_at is not None:
                toks = [t if i < self.diverge_at else 96 - t for i, t in enumerate(toks)]
            out.append(toks)
        return out


class ShortEngine(StubEngine):
    def generate(self, prompts, max_tokens):
        return [[1] for _ in prompts]  # stopped early: EOS was not suppressed


def _cfg(**kw) -> offline.OfflineConfig:
    return offline.OfflineConfig(**{"prompt_len": 16, "new_tokens": 8, "batch": 3, "runs": 2, **kw})


def test_make_prompts_are_disjoint_real_text_windows(word_tokenizer) -> None:
    cfg = _cfg()
    prompts = offline.make_prompts(word_tokenizer, cfg)
    assert len(prompts) == 3 and all(len(p) == 16 for p in prompts)
    assert prompts == offline.make_prompts(word_tokenizer, cfg)  # deterministic
    assert prompts[0] != prompts[1]


def test_run_offline_interleaves_and_reports(word_tokenizer, tmp_path) -> None:
    cfg = _cfg()
    prompts = offline.make_prompts(word_tokenizer, cfg)
    ref, same, diff = StubEngine("bastion"), StubEngine("hf-fp32"), StubEngine("hf-bf16", diverge_at=5)
    logs: list[str] = []
    result = offline.run_offline([ref, same, diff], prompts, cfg, log=logs.append)

    # warm-up (2 calls) + per run: t(1) and t(N) at batch 1 and at batch 3
    assert ref.calls[:2] == [(3, 2), (1, 2)]
    assert ref.calls[2:6] == [(1, 1), (1, 8), (3, 1), (3, 8)]
    assert len(ref.calls) == 2 + 4 * cfg.runs and len(logs) == 3 * cfg.runs
    assert result["reference"] == "bastion" and result["engines"] == ["bastion", "hf-fp32", "hf-bf16"]
    assert result["agreement_with_reference"] == {"hf-fp32": 8, "hf-bf16": 5}
    for name in ("bastion", "hf-fp32", "hf-bf16"):
        assert len(result["raw"][name]) == cfg.runs
        assert result["medians"][name]["prefill_tok_s"] > 0
    assert set(result["ratios"]) == {"hf-fp32", "hf-bf16"}
    json.dumps(result)  # serialisable as is

    png = plots.plot_offline(result, tmp_path / "offline.png")
    assert png.read_bytes()[:8] == _PNG_MAGIC
    table = plots.offline_table(result)
    assert "| hf-bf16 |" in table and "bastion / engine" in table


def test_engine_that_stops_early_is_an_error(word_tokenizer) -> None:
    cfg = _cfg(runs=1)
    prompts = offline.make_prompts(word_tokenizer, cfg)
    with pytest.raises(RuntimeError, match="asked for 2 tokens"):
        offline.run_offline([ShortEngine("x")], prompts, cfg)


def test_run_offline_checks_prompt_shapes(word_tokenizer) -> None:
    with pytest.raises(ValueError):
        offline.run_offline([StubEngine("a")], [[1, 2, 3]], _cfg())
    with pytest.raises(ValueError):
        offline.run_offline([], [], _cfg())


def test_shared_prefix() -> None:
    assert offline.shared_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert offline.shared_prefix([], [1]) == 0
    assert offline.shared_prefix([5, 6], [5, 6]) == 2


@pytest.mark.parametrize("kwargs", [
    {"prompt_len": 0}, {"new_tokens": 1}, {"batch": 0}, {"runs": 0}, {"threads": 0}, {"time_limit_s": 0}])
def test_offline_config_validation(kwargs) -> None:
    with pytest.raises(ValueError):
        offline.OfflineConfig(**kwargs)


def test_cli_offline_rejects_unknown_engine(capsys) -> None:
    assert cli.main(["offline", "--engines", "bastion,tgi"]) == 2
    assert "unknown engines" in capsys.readouterr().err
    assert cli.main(["offline", "--engines", "hf-fp32", "--runs", "0"]) == 2
