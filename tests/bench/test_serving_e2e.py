"""The load generator against a fake OpenAI server on loopback: what it sends, what it
reports, the files it writes, and the subprocess launcher. No timing assertions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bastion.bench import cli, peers, plots, serving
from bastion.bench.peers import Endpoint

from .fake_openai_server import start_in_thread

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_SMALL = serving.WorkloadConfig(input_len=24, output_len=6, range_ratio=0.5, seed=11)


def _quick_cfg(**kw) -> serving.ServingConfig:
    base = dict(concurrencies=(1, 4), rounds=1, min_requests=2, repeats=2, warmup_requests=1,
                request_timeout_s=30, level_timeout_s=60, total_timeout_s=120)
    return serving.ServingConfig(**{**base, **kw})


def test_run_serving_two_endpoints_same_requests(fake_openai, word_tokenizer, tmp_path) -> None:
    other, thread = start_in_thread(model="other")
    try:
        corpus = word_tokenizer.encode(serving.load_corpus_text())
        eps = [Endpoint("ref", fake_openai.url, "fake-model"),
               Endpoint("peer", other.url, "other", dialect="transformers")]
        logs: list[str] = []
        result = serving.run_serving(eps, corpus, word_tokenizer, _SMALL, _quick_cfg(), log=logs.append)
    finally:
        other.shutdown()
        other.server_close()
        thread.join(timeout=5)

    # warm-up 1 + (c=1: 2 requests, c=4: 4 requests) x 2 repeats, on each server
    assert len(fake_openai.bodies) == len(other.bodies) == 1 + 2 * (2 + 4)
    ref_prompts = [tuple(b["prompt"]) for b in fake_openai.bodies]
    peer_prompts = [b["prompt"] for b in other.bodies]
    # Same requests on both servers (ids to one, their text to the other), in some order.
    assert sorted(word_tokenizer.decode(list(p)) for p in ref_prompts) == sorted(peer_prompts)
    assert all(b["ignore_eos"] is True and b["stream"] for b in fake_openai.bodies)
    assert all("generation_config" in b and "ignore_eos" not in b for b in other.bodies)

    assert not result["partial"] and result["reference"] == "ref"
    assert len(logs) == 2 * 2 * 2
    for name in ("ref", "peer"):
        for c in ("1", "4"):
            m = result["medians"][name][c]
            assert m["runs"] == 2 and m["failed"] == 0
            assert m["output_tok_s"] > 0 and m["request_s"] > 0
            assert m["ttft_p50_ms"] <= m["ttft_p99_ms"] and m["itl_p50_ms"] <= m["itl_p99_ms"]
            assert m["short_outputs"] == 0
    assert set(result["ratios"]["peer"]) == {"1", "4"}
    assert result["ratios"]["peer"]["4"]["output_tok_s"] > 0

    # The fake server reports usage only on the openai dialect; both count all tokens.
    exp = sum(r.output_len for r in serving.make_requests(corpus, word_tokenizer, _SMALL, 4, _SMALL.seed + 1))
    assert result["runs"]["ref"]["4"][0]["output_tokens"] == exp
    assert result["runs"]["peer"]["4"][0]["output_tokens"] == exp

    json_path = serving.write_json(result, tmp_path)
    assert json.loads(json_path.read_text())["medians"]["ref"]["1"]["runs"] == 2
    png = plots.plot_serving(result, tmp_path / "serving.png")
    assert png.read_bytes()[:8] == _PNG_MAGIC
    table = plots.serving_table(result)
    assert "| ref | 4 |" in table and "ref vs peer" in table


def test_failed_requests_are_counted_not_raised(fake_openai, word_tokenizer) -> None:
    corpus = word_tokenizer.encode(serving.load_corpus_text())
    ep = Endpoint("bad", fake_openai.url, "no-such-model")  # the fake server answers 404
    reqs = serving.make_requests(corpus, word_tokenizer, _SMALL, 3, seed=0)
    import asyncio

    results, _, complete = asyncio.run(serving.run_level(ep, reqs, 2, _quick_cfg()))
    assert complete and len(results) == 3
    assert all(not r.ok and r.error and r.error.startswith("HTTP 404") for r in results)
    with pytest.raises(RuntimeError, match="warm-up failed"):
        serving.run_serving([ep], corpus, word_tokenizer, _SMALL, _quick_cfg())


def test_server_process_launch_ready_and_stop(tmp_path) -> None:
    port = peers.free_port()
    script = Path(__file__).with_name("fake_openai_server.py")
    spec = peers.ServerSpec("fake", (sys.executable, str(script), str(port)), port, startup_timeout_s=30)
    with peers.running(spec, tmp_path) as proc:
        assert proc.model_name() == "fake-model"
        pid = proc.proc.pid
    assert proc.proc.poll() is not None  # stopped on exit of the with block
    assert (tmp_path / "fake.log").exists() and pid > 0


def test_server_that_dies_at_start_is_reported(tmp_path) -> None:
    port = peers.free_port()
    spec = peers.ServerSpec("dies", (sys.executable, "-c", "print('no model here'); raise SystemExit(3)"),
                            port, startup_timeout_s=30)
    with pytest.raises(RuntimeError, match="exited with 3(.|\n)*no model here"):
        with peers.running(spec, tmp_path):
            pass


def test_cli_serving_against_url(fake_openai, word_tokenizer, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(peers, "load_tokenizer", lambda path=None: word_tokenizer)
    rc = cli.main(["serving", "--url", fake_openai.url, "--concurrency", "1,2", "--input-len", "16",
                   "--output-len", "4", "--repeats", "1", "--rounds", "1", "--min-requests", "2",
                   "--warmup", "1", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "serving.json").read_text())
    assert data["reference"] == "bastion" and set(data["medians"]["bastion"]) == {"1", "2"}
    assert (tmp_path / "serving.png").read_bytes()[:8] == _PNG_MAGIC
    assert "| bastion | 2 |" in (tmp_path / "serving.md").read_text()
    assert fake_openai.bodies[0]["model"] == "fake-model"  # found through /v1/models


def test_cli_rejects_bad_arguments(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serving", "--peer", "tgi=/usr/bin/python3"])
    assert cli.main(["serving", "--no-bastion", "--repeats", "0"]) == 2
    assert cli.main(["serving", "--no-bastion"]) == 2  # nothing to benchmark
