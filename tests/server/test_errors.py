"""Bad inputs over raw HTTP: every error has the right status and an OpenAI-style
body, and the server keeps answering /health afterwards.

Tests on `api_server` hold for any engine; the injected-failure tests (429, 503, 500,
engine-side 413) need the FakeEngine.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from bastion.engine.outputs import EngineDeadError, PromptTooLongError, QueueFullError

from tests.support.servers import ServerThread

CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]


def assert_openai_error(r: httpx.Response, status: int, *, code: str | None = None, param: str | None = None,
                        srv: ServerThread | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    assert "Traceback" not in err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    if srv is not None:  # and the server is still serving
        with srv.http() as http:
            assert http.get("/health").status_code == 200
            assert http.post(CHAT_URL, json={"messages": MSG, "max_tokens": 1}).status_code == 200
    return err


def test_malformed_json_is_400(api_server: ServerThread) -> None:
    with api_server.http() as http:
        r = http.post(CHAT_URL, content=b'{"messages": [', headers={"content-type": "application/json"})
    err = assert_openai_error(r, 400, code="invalid_json", srv=api_server)
    assert "JSON" in err["message"]


def test_body_not_an_object_is_400(api_server: ServerThread) -> None:
    with api_server.http() as http:
        r = http.post(COMPLETIONS_URL, json=[1, 2, 3])
    assert_openai_error(r, 400, srv=api_server)


def test_missing_field_is_400(api_server: ServerThread) -> None:
    with api_server.http() as http:
        r = http.post(CHAT_URL, json={"max_tokens": 3})
    assert_openai_error(r, 400, param="messages")


def test_unknown_model_is_404(api_server: ServerThread) -> None:
    with api_server.http() as http:
        r = http.post(CHAT_URL, json={"model": "no-such-model", "messages": MSG})
        assert_openai_error(r, 404, code="model_not_found", param="model", srv=api_server)
        assert_openai_error(http.get("/v1/models/no-such-model"), 404, code="model_not_found")


def test_unknown_route_and_method(api_server: ServerThread) -> None:
    with api_server.http() as http:
        assert_openai_error(http.get("/v1/nothing"), 404, code="not_found")
        assert_openai_error(http.get(CHAT_URL), 405, code="method_not_allowed")


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", "ten"),
    ("temperature", -0.1), ("top_p", 0), ("top_p", 1.5), ("top_k", -2),
    ("n", 2), ("n", 0), ("min_tokens", -1), ("logprobs", "yes"), ("top_logprobs", 21),
    ("presence_penalty", 0.5), ("logit_bias", {"42": 1.0}), ("stop", 7), ("seed", 2**70),
    ("messages", []), ("messages", [{"role": "wizard", "content": "x"}]),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
    ("stream_options", {"include_usage": True}),  # without stream
])
def test_bad_chat_values_are_400(api_server: ServerThread, field: str, value: Any) -> None:
    body = {"model": api_server.model, "messages": MSG, "max_tokens": 4, field: value}
    with api_server.http() as http:
        r = http.post(CHAT_URL, json=body)
    err = assert_openai_error(r, 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] is None or err["param"].split(".")[0] == field


@pytest.mark.parametrize("extra", [
    {"logprobs": 21}, {"prompt": []}, {"prompt": [1, -3]}, {"suffix": "x"}, {"best_of": 3},
    {"min_tokens": 10, "max_tokens": 4}, {"prompt_logprobs": 99}, {"echo": "maybe"},
    {"stream": True, "prompt": ["a", "b"]},
])
def test_bad_completion_values_are_400(api_server: ServerThread, extra: dict[str, Any]) -> None:
    body = {"model": api_server.model, "prompt": "hi", "max_tokens": 4, **extra}
    with api_server.http() as http:
        r = http.post(COMPLETIONS_URL, json=body)
    assert_openai_error(r, 400)


def test_nan_temperature_is_400(api_server: ServerThread) -> None:
    raw = b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    with api_server.http() as http:
        r = http.post(CHAT_URL, content=raw, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)


def test_oversized_max_tokens_is_400(api_server: ServerThread) -> None:
    too_many = api_server.engine.max_model_len + 1
    with api_server.http() as http:
        r = http.post(CHAT_URL, json={"messages": MSG, "max_tokens": too_many})
    assert_openai_error(r, 400, param="max_tokens", srv=api_server)


def test_prompt_longer_than_context_is_413(api_server: ServerThread) -> None:
    long_prompt = "hello " * (api_server.engine.max_model_len * 2)
    with api_server.http() as http:
        r = http.post(COMPLETIONS_URL, json={"prompt": long_prompt, "max_tokens": 1})
        assert_openai_error(r, 413, code="context_length_exceeded", srv=api_server)
        r = http.post(CHAT_URL, json={"messages": [{"role": "user", "content": long_prompt}], "stream": True})
        assert_openai_error(r, 413, code="context_length_exceeded")


def test_prompt_plus_max_tokens_over_context_is_413(api_server: ServerThread) -> None:
    n_prompt = len(api_server.engine.encode_prompt("hi"))
    max_tokens = api_server.engine.max_model_len - n_prompt + 1  # fits alone, not with the prompt
    with api_server.http() as http:
        r = http.post(COMPLETIONS_URL, json={"prompt": "hi", "max_tokens": max_tokens})
    assert_openai_error(r, 413, code="context_length_exceeded", srv=api_server)


# ------------------------------------------------------------ injected engine errors


@pytest.mark.parametrize("stream", [False, True])
def test_queue_full_is_429_with_retry_after(fake_server: ServerThread, stream: bool) -> None:
    fake_server.engine.inject(QueueFullError("waiting queue at its bound"))
    with fake_server.http() as http:
        r = http.post(CHAT_URL, json={"messages": MSG, "stream": stream})
    assert_openai_error(r, 429, code="rate_limit_exceeded", srv=fake_server)
    assert int(r.headers["retry-after"]) >= 1


def test_queue_full_through_openai_client(fake_server: ServerThread) -> None:
    import openai

    fake_server.engine.inject(QueueFullError("full"))
    with pytest.raises(openai.RateLimitError):
        fake_server.openai().completions.create(model=fake_server.model, prompt="hi", max_tokens=2)


def test_engine_prompt_too_long_is_413(fake_server: ServerThread) -> None:
    fake_server.engine.inject(PromptTooLongError("needs more KV blocks than the pool has"))
    with fake_server.http() as http:
        r = http.post(COMPLETIONS_URL, json={"prompt": "hi", "max_tokens": 2})
    assert_openai_error(r, 413, code="context_length_exceeded", srv=fake_server)


@pytest.mark.parametrize("stream", [False, True])
def test_engine_dead_is_503(fake_server: ServerThread, stream: bool) -> None:
    fake_server.engine.inject(EngineDeadError("engine loop stopped"))
    with fake_server.http() as http:
        r = http.post(CHAT_URL, json={"messages": MSG, "stream": stream})
    assert_openai_error(r, 503, srv=fake_server)


def test_unexpected_error_is_500_without_details(fake_server: ServerThread) -> None:
    fake_server.engine.inject(RuntimeError("SECRET internal detail"))
    with fake_server.http() as http:
        r = http.post(CHAT_URL, json={"messages": MSG})
    err = assert_openai_error(r, 500, code="internal_error", srv=fake_server)
    assert "SECRET" not in r.text and err["type"] == "server_error"


def test_batch_with_one_failure_fails_whole_request(fake_server: ServerThread) -> None:
    fake_server.engine.inject(QueueFullError("full"))
    with fake_server.http() as http:
        r = http.post(COMPLETIONS_URL, json={"prompt": ["a", "b", "c"], "max_tokens": 2})
    assert_openai_error(r, 429, srv=fake_server)
    assert fake_server.engine.stats().num_running == 0
