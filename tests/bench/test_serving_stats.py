"""Pure parts of the serving benchmark: statistics, SSE parsing, the prompt workload."""

from __future__ import annotations

import random

import numpy as np
import pytest

from bastion.bench import serving
from bastion.bench.peers import Endpoint
from bastion.bench.serving import BenchRequest, SSEDecoder, percentile, result_from_events


# ---------------------------------------------------------------- percentiles


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    rng = random.Random(7)
    xs = [rng.random() * 100 for _ in range(37)]
    assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_percentile_edge_cases() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0  # input order does not matter
    with pytest.raises(ValueError):
        percentile([1.0], 101)


# ---------------------------------------------------------------- timing of one stream


def _chunk(text: str) -> dict:
    return {"choices": [{"index": 0, "text": text}]}


def test_ttft_and_itl_from_timestamps() -> None:
    req = BenchRequest((1, 2, 3), "a b c", 4)
    events = [(10.5, _chunk("a")), (10.75, _chunk("")), (11.0, _chunk("b")), (11.5, _chunk("c")),
              (12.5, _chunk("d")), (12.6, {"choices": [], "usage": {"completion_tokens": 4}})]
    r = result_from_events(10.0, events, 13.0, req)
    assert r.ok and r.error is None
    assert r.ttft_s == pytest.approx(0.5)
    # An empty-text chunk is not a token: gaps are between the 4 text chunks only.
    assert r.itls_s == pytest.approx([0.5, 0.5, 1.0])
    assert r.latency_s == pytest.approx(3.0)
    assert r.output_tokens == 4 and r.prompt_len == 3


def test_output_tokens_without_usage_counts_text_chunks() -> None:
    req = BenchRequest((1,), "a", 8)
    r = result_from_events(0.0, [(1.0, _chunk("x")), (2.0, _chunk("y"))], 3.0, req)
    assert r.output_tokens == 2 and r.itls_s == [1.0]


def test_chat_delta_chunks_are_tokens_too() -> None:
    req = BenchRequest((1,), "a", 2)
    chat = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
    r = result_from_events(0.0, [(0.25, chat), (0.5, chat)], 1.0, req)
    assert r.ttft_s == 0.25 and r.output_tokens == 2


def test_error_chunk_or_empty_stream_is_a_failure() -> None:
    req = BenchRequest((1,), "a", 2)
    r = result_from_events(0.0, [(0.1, _chunk("a")), (0.2, {"error": "boom"})], 0.3, req)
    assert not r.ok and "boom" in (r.error or "")
    r = result_from_events(0.0, [], 0.3, req)
    assert not r.ok and r.error == "no tokens streamed"


def test_summarize_counts_and_rates() -> None:
    req = BenchRequest((1, 2), "a b", 3)
    ok = result_from_events(0.0, [(1.0, _chunk("a")), (2.0, _chunk("b")), (3.0, _chunk("c"))], 3.0, req)
    bad = result_from_events(0.0, [], 1.0, req)
    s = serving.summarize([ok, ok, bad], duration_s=2.0, concurrency=2)
    assert (s["requests"], s["completed"], s["failed"]) == (3, 2, 1)
    assert s["output_tokens"] == 6 and s["output_tok_s"] == 3.0 and s["request_s"] == 1.0
    assert s["ttft_p50_ms"] == pytest.approx(1000.0) and s["itl_p99_ms"] == pytest.approx(1000.0)
    assert s["tpot_p50_ms"] == pytest.approx(1000.0)
    assert s["errors"] == ["no tokens streamed"]


def test_medians_and_ratios_direction() -> None:
    runs = [{"output_tok_s": 10.0, "ttft_p50_ms": 100.0, "complete": True, "errors": []},
            {"output_tok_s": 30.0, "ttft_p50_ms": 300.0, "complete": True, "errors": []},
            {"output_tok_s": 20.0, "ttft_p50_ms": None, "complete": False, "errors": []}]
    m = serving.median_of_runs(runs)
    assert m["output_tok_s"] == 20.0 and m["ttft_p50_ms"] == 200.0 and m["runs"] == 3
    assert "complete" not in m  # booleans are not metrics
    r = serving.ratios({"a": {4: {"output_tok_s": 30.0, "ttft_p50_ms": 50.0}},
                        "b": {4: {"output_tok_s": 10.0, "ttft_p50_ms": 100.0}}}, "a")
    # > 1 means the reference is better, for throughput (higher) and latency (lower) alike.
    assert r["b"]["4"]["output_tok_s"] == pytest.approx(3.0)
    assert r["b"]["4"]["ttft_p50_ms"] == pytest.approx(2.0)


# ---------------------------------------------------------------- SSE


def test_sse_decoder_events_comments_and_multiline() -> None:
    dec = SSEDecoder()
    lines = [": keep-alive", "", "event: message", "data: {\"a\": 1}", "", "data:first", "data: second",
             "\r", "id: 7", "data: [DONE]", ""]
    events = [e for e in (dec.feed(line) for line in lines) if e is not None]
    assert events == ['{"a": 1}', "first\nsecond", "[DONE]"]


def test_sse_decoder_flushes_an_unterminated_event() -> None:
    dec = SSEDecoder()
    assert dec.feed("data: tail") is None
    assert dec.flush() == "tail"
    assert dec.flush() is None


# ---------------------------------------------------------------- workload


def test_prompt_distribution_is_deterministic_and_in_bounds(word_tokenizer) -> None:
    corpus = word_tokenizer.encode(serving.load_corpus_text())
    cfg = serving.WorkloadConfig(input_len=40, output_len=20, range_ratio=0.5)
    a = serving.make_requests(corpus, word_tokenizer, cfg, 30, seed=3)
    b = serving.make_requests(corpus, word_tokenizer, cfg, 30, seed=3)
    c = serving.make_requests(corpus, word_tokenizer, cfg, 30, seed=4)
    assert a == b and a != c
    assert all(20 <= len(r.prompt_ids) <= 60 and 10 <= r.output_len <= 30 for r in a)
    assert len({len(r.prompt_ids) for r in a}) > 1  # a distribution, not one length
    assert all(r.prompt_text == word_tokenizer.decode(list(r.prompt_ids)) for r in a)


def test_fixed_lengths_when_range_ratio_is_zero(word_tokenizer) -> None:
    corpus = word_tokenizer.encode(serving.load_corpus_text())
    cfg = serving.WorkloadConfig(input_len=32, output_len=8, range_ratio=0.0)
    reqs = serving.make_requests(corpus, word_tokenizer, cfg, 10, seed=0)
    assert {len(r.prompt_ids) for r in reqs} == {32} and {r.output_len for r in reqs} == {8}


def test_corpus_reads_each_file_once(tmp_path) -> None:
    (tmp_path / "A").write_text("alpha text")
    (tmp_path / "B").write_text("beta text")
    (tmp_path / "A-link").symlink_to(tmp_path / "A")
    assert serving.load_corpus_text(tmp_path) == "alpha text\n\nbeta text"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError):
        serving.load_corpus_text(empty)


# ---------------------------------------------------------------- configs and request bodies


@pytest.mark.parametrize("kwargs", [
    {"input_len": 0}, {"output_len": -1}, {"range_ratio": 1.0}, {"range_ratio": -0.1}])
def test_workload_config_validation(kwargs) -> None:
    with pytest.raises(ValueError):
        serving.WorkloadConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"concurrencies": ()}, {"concurrencies": (0, 4)}, {"repeats": 0}, {"rounds": 0},
    {"warmup_requests": -1}, {"level_timeout_s": 0}])
def test_serving_config_validation(kwargs) -> None:
    with pytest.raises(ValueError):
        serving.ServingConfig(**kwargs)


def test_request_bodies_per_dialect() -> None:
    req = BenchRequest((5, 6, 7), "five six seven", 9)
    b = Endpoint("x", "http://127.0.0.1:1", "m").body(req)
    assert b["prompt"] == [5, 6, 7] and b["ignore_eos"] is True and b["max_tokens"] == 9
    assert b["stream"] is True and b["temperature"] == 0.0
    assert Endpoint("x", "u", "m", prompt_format="text").body(req)["prompt"] == "five six seven"
    t = Endpoint("x", "u", "m", dialect="transformers").body(req)
    assert t["prompt"] == "five six seven" and "ignore_eos" not in t and '"eos_token_id": -1' in t["generation_config"]
    ll = Endpoint("x", "u", "m", dialect="llamacpp", banned_token_ids=(0, 2)).body(req)
    assert ll["logit_bias"] == {"0": -100.0, "2": -100.0} and ll["prompt"] == "five six seven"
    with pytest.raises(ValueError):
        Endpoint("x", "u", "m", dialect="llamacpp")
    with pytest.raises(ValueError):
        Endpoint("x", "u", "m", dialect="tgi")
