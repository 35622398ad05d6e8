"""Regression tests for what fuzzing found (issue 16), each over real HTTP: numbers that
overflowed inside the engine, lenient types, NaN temperatures, huge bodies, admin loads of
devices and FIFOs, and the contract that one request's failure is that request's alone.
Every test ends by checking that the server still serves."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from bastion.config import ServerConfig

from tests.support.servers import ServerThread

CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]


def still_serving(srv: ServerThread) -> None:
    with srv.http() as http:
        assert http.get("/health").status_code == 200
        r = http.post(CHAT_URL, json={"messages": MSG, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text


def assert_400(r: httpx.Response, param: str | None = None) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"]
    if param is not None:
        assert err["param"] == param, err


# ------------------------------------------------------------------ 1. numbers at the edge
@pytest.mark.parametrize("url,extra,param", [
    (CHAT_URL, {"top_k": 100000000000000000000}, "top_k"),
    (CHAT_URL, {"top_k": 2**63}, "top_k"),
    (CHAT_URL, {"top_k": "vocab+1"}, "top_k"),
    (COMPLETIONS_URL, {"min_tokens": 1, "stop_token_ids": [1000000]}, "stop_token_ids"),
    (COMPLETIONS_URL, {"min_tokens": 1, "stop_token_ids": [2**63]}, "stop_token_ids.0"),
    (COMPLETIONS_URL, {"min_tokens": 1, "stop_token_ids": ["vocab"]}, "stop_token_ids"),
    (COMPLETIONS_URL, {"stop_token_ids": [-1]}, "stop_token_ids.0"),
    (CHAT_URL, {"max_tokens": 2**64}, "max_tokens"),
    (CHAT_URL, {"min_tokens": 2**63}, "min_tokens"),
    (CHAT_URL, {"seed": 2**64}, "seed"),
    (CHAT_URL, {"n": 2**63}, "n"),
    (COMPLETIONS_URL, {"prompt": [2**63]}, "prompt"),
    (COMPLETIONS_URL, {"prompt": ["vocab"]}, "prompt"),
])
def test_out_of_range_numbers_are_400_and_the_server_lives(api_server, url, extra, param):
    vocab = api_server.engine.vocab_size
    extra = {k: ([vocab if x == "vocab" else x for x in v] if isinstance(v, list) else vocab + 1 if v == "vocab+1"
                 else v) for k, v in extra.items()}
    body = {"max_tokens": 3, **extra}
    body.setdefault("prompt", "Once upon a time") if url == COMPLETIONS_URL else body.setdefault("messages", MSG)
    with api_server.http() as http:
        r = http.post(url, json=body)
    assert_400(r)
    assert r.json()["error"]["param"].startswith(param)
    still_serving(api_server)


def test_bounds_that_fit_are_accepted(api_server):
    vocab = api_server.engine.vocab_size
    with api_server.http() as http:
        r = http.post(COMPLETIONS_URL, json={"prompt": "Once upon a time", "max_tokens": 3, "top_k": vocab,
                                             "min_tokens": 1, "stop_token_ids": [vocab - 1], "seed": 2**64 - 1,
                                             "temperature": 0.8})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------ 5. strict types
@pytest.mark.parametrize("url,extra,param", [
    (CHAT_URL, {"max_tokens": "16"}, "max_tokens"),
    (CHAT_URL, {"max_tokens": True}, "max_tokens"),
    (CHAT_URL, {"max_tokens": 16.5}, "max_tokens"),
    (CHAT_URL, {"temperature": "0.5"}, "temperature"),
    (CHAT_URL, {"top_k": False}, "top_k"),
    (CHAT_URL, {"stream": "true"}, "stream"),
    (CHAT_URL, {"logprobs": 1}, "logprobs"),
    (COMPLETIONS_URL, {"logprobs": True}, "logprobs"),
    (COMPLETIONS_URL, {"echo": 1}, "echo"),
    (COMPLETIONS_URL, {"prompt": [True, False]}, "prompt"),
])
def test_lenient_types_are_400(api_server, url, extra, param):
    body = {"max_tokens": 3, **extra}
    body.setdefault("prompt", "Hello") if url == COMPLETIONS_URL else body.setdefault("messages", MSG)
    with api_server.http() as http:
        r = http.post(url, json=body)
    assert_400(r)
    assert r.json()["error"]["param"].startswith(param)


def test_integer_for_a_float_field_is_fine(api_server):
    with api_server.http() as http:
        r = http.post(CHAT_URL, json={"messages": MSG, "max_tokens": 2, "temperature": 1, "top_p": 1})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------ 6. tiny temperatures
@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_tiny_temperature_is_greedy_not_nan(real_server, temperature):
    with real_server.http() as http:
        def answer(t):
            r = http.post(CHAT_URL, json={"messages": [{"role": "user", "content": "What is the capital of France?"}],
                                          "max_tokens": 12, "temperature": t, "logprobs": True})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert all(lp["logprob"] == lp["logprob"] for lp in choice["logprobs"]["content"])  # no NaN
            return choice["message"]["content"]

        assert answer(temperature) == answer(0)


# ------------------------------------------------------------------ 7. body encoding, auth scheme
def test_invalid_utf8_body_is_400_with_a_code(api_server):
    with api_server.http() as http:
        r = http.post(CHAT_URL, content=b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
                      headers={"content-type": "application/json"})
    assert_400(r)
    assert r.json()["error"]["code"] == "invalid_json"
    still_serving(api_server)


@pytest.fixture(scope="module")
def keyed_server(fake_engine):
    handle = ServerThread.start(fake_engine, ServerConfig(api_key="k3y", admin_key="adm", max_body_bytes=64_000))
    yield handle
    handle.stop()


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_in_any_case(keyed_server, scheme):
    with keyed_server.http() as http:
        r = http.get("/v1/models", headers={"Authorization": f"{scheme} k3y"})
        assert r.status_code == 200, r.text
        assert http.get("/v1/models", headers={"Authorization": f"{scheme} wrong"}).status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Basic k3y"}).status_code == 401


# ------------------------------------------------------------------ 3. body size
def test_body_over_the_limit_is_413_before_it_is_read(keyed_server):
    auth = {"Authorization": "Bearer k3y"}
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * 100_000 + b'"}]}'
    with keyed_server.http() as http:
        t0 = time.monotonic()
        r = http.post(CHAT_URL, content=big, headers={**auth, "content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(20):
                yield b"a" * 10_000
            yield b'"}]}'

        r = http.post(CHAT_URL, content=chunks(), headers={**auth, "content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        assert time.monotonic() - t0 < 10
        ok = http.post(CHAT_URL, json={"messages": MSG, "max_tokens": 2}, headers=auth)
        assert ok.status_code == 200, ok.text


@pytest.mark.slow
def test_a_huge_prompt_does_not_stall_health_or_other_streams(real_server):
    """Tokenizing ~3.5 MB of text takes seconds; it runs off the event loop, so /health
    and a bystander stream keep answering meanwhile."""
    text = open("/usr/share/common-licenses/GPL-3", encoding="utf-8").read()
    prompt = (text * (3_500_000 // len(text) + 1))[:3_500_000]
    done = threading.Event()
    result = {}

    def big():
        with real_server.http(timeout=120) as http:
            result["r"] = http.post(COMPLETIONS_URL, json={"prompt": prompt, "max_tokens": 4})
        done.set()

    threading.Thread(target=big, daemon=True).start()
    worst, samples = 0.0, 0
    with real_server.http() as http:
        time.sleep(0.3)  # let the big body arrive and tokenizing start
        while not done.is_set() and samples < 200:
            t0 = time.monotonic()
            assert http.get("/health").status_code == 200
            worst = max(worst, time.monotonic() - t0)
            samples += 1
            time.sleep(0.05)
    assert done.wait(120)
    assert result["r"].status_code == 413, result["r"].text  # longer than the context: after tokenizing
    assert samples >= 5, "the big request finished too fast to measure anything"
    assert worst < 1.0, f"/health took {worst:.2f} s while a huge prompt was tokenized"


# ------------------------------------------------------------------ 4. admin key first, names
def test_admin_key_is_checked_before_the_body(keyed_server):
    auth = {"Authorization": "Bearer k3y"}
    with keyed_server.http() as http:
        for body in (b"{not json", b'{"lora_name": 5}', b'{"lora_name": "a", "lora_path": "/x", "extra": 1}'):
            r = http.post("/v1/load_lora_adapter", content=body, headers={**auth, "content-type": "application/json"})
            assert r.status_code == 401, r.text
            assert "lora_name" not in r.text and "extra" not in r.text
        r = http.post("/v1/load_lora_adapter", content=b"{not json",
                      headers={**auth, "X-Admin-Key": "adm", "content-type": "application/json"})
        assert_400(r)


@pytest.mark.parametrize("name", ["..", ".", "-rf", "a/b", "", "x" * 129])
def test_adapter_names_that_are_not_names_are_400(keyed_server, name):
    headers = {"Authorization": "Bearer k3y", "X-Admin-Key": "adm"}
    with keyed_server.http() as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "/tmp"}, headers=headers)
    assert_400(r, "lora_name")
