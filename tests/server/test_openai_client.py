"""The API through the official `openai` client, over real HTTP.

Every test here uses `api_server`, so it runs against the FakeEngine now and against
the real engine once tests/conftest.py provides `real_engine`. Assertions are
therefore about the contract (shapes, counts, determinism, stop/length semantics),
not about particular words, except where `is_fake` says the text is known.
"""

from __future__ import annotations

import math

import pytest

from tests.support.servers import ServerThread, is_fake
from tests.support.fake_engine import SCRIPT

CHAT = [{"role": "user", "content": "Say hello."}]
GREEDY = {"temperature": 0.0}


def _greedy_chat(srv: ServerThread, **kw):
    return srv.openai().chat.completions.create(model=srv.model, messages=CHAT, **GREEDY, **kw)


def test_models_lists_engine_model(api_server: ServerThread) -> None:
    models = api_server.openai().models.list()
    assert [m.id for m in models.data] == [api_server.model]
    assert api_server.openai().models.retrieve(api_server.model).id == api_server.model


def test_chat_completion(api_server: ServerThread) -> None:
    r = _greedy_chat(api_server, max_tokens=20)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == api_server.model and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if is_fake(api_server):
        assert choice.message.content == SCRIPT[:20] and choice.finish_reason == "length"


def test_completion(api_server: ServerThread) -> None:
    r = api_server.openai().completions.create(model=api_server.model, prompt="Once upon a time", max_tokens=12,
                                                **GREEDY)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 12
    if is_fake(api_server):
        assert r.choices[0].text == SCRIPT[:12]


def test_completion_accepts_token_ids(api_server: ServerThread) -> None:
    ids = api_server.engine.encode_prompt("Once upon a time")
    r = api_server.openai().completions.create(model=api_server.model, prompt=ids, max_tokens=5, **GREEDY)
    assert r.usage.prompt_tokens == len(ids)
    by_text = api_server.openai().completions.create(model=api_server.model, prompt="Once upon a time",
                                                     max_tokens=5, **GREEDY)
    assert r.choices[0].text == by_text.choices[0].text


def test_batch_prompts_give_one_choice_each(api_server: ServerThread) -> None:
    r = api_server.openai().completions.create(model=api_server.model, prompt=["One", "Two", "Three"],
                                                max_tokens=4, extra_body={"ignore_eos": True}, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices) and r.usage.completion_tokens == 12
    single = api_server.openai().completions.create(model=api_server.model, prompt="Two", max_tokens=4,
                                                     extra_body={"ignore_eos": True}, **GREEDY)
    assert r.choices[1].text == single.choices[0].text


def test_max_tokens_is_exact_with_ignore_eos(api_server: ServerThread) -> None:
    r = _greedy_chat(api_server, max_tokens=7, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    r = _greedy_chat(api_server, max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3


def test_stop_string_truncates(api_server: ServerThread) -> None:
    full = _greedy_chat(api_server, max_tokens=40, extra_body={"ignore_eos": True}).choices[0].message.content
    words = [w for w in full.split() if len(w) >= 3]
    if len(words) < 2:
        pytest.skip("greedy output too short to pick a stop word")
    stop = words[1]
    r = _greedy_chat(api_server, max_tokens=40, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.find(stop)]
    assert stop not in r.choices[0].message.content


def test_streaming_chat_matches_non_streaming(api_server: ServerThread) -> None:
    full = _greedy_chat(api_server, max_tokens=16).choices[0].message.content
    stream = _greedy_chat(api_server, max_tokens=16, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 16
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_streaming_completion(api_server: ServerThread) -> None:
    full = api_server.openai().completions.create(model=api_server.model, prompt="Hi", max_tokens=10, **GREEDY)
    stream = api_server.openai().completions.create(model=api_server.model, prompt="Hi", max_tokens=10,
                                                     stream=True, **GREEDY)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_streaming_stop_string(api_server: ServerThread) -> None:
    full = _greedy_chat(api_server, max_tokens=40, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 3]
    stream = _greedy_chat(api_server, max_tokens=40, stop=stop, stream=True, extra_body={"ignore_eos": True})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == full[: full.find(stop)]


def test_chat_logprobs(api_server: ServerThread) -> None:
    r = _greedy_chat(api_server, max_tokens=6, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    if is_fake(api_server):  # single-token decodes need not concatenate to the text in general
        assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3 and t.bytes == list(t.token.encode())
        # greedy: the chosen token is the most likely one
        assert math.isclose(t.logprob, max(x.logprob for x in t.top_logprobs), abs_tol=1e-4)


def test_chat_without_logprobs_has_none(api_server: ServerThread) -> None:
    assert _greedy_chat(api_server, max_tokens=3).choices[0].logprobs is None


def test_completion_echo_logprobs_scores_prompt(api_server: ServerThread) -> None:
    """echo + logprobs: every prompt token gets a logprob (the first has none), which is
    how perplexity is computed through the API."""
    prompt = "The capital of France is Paris."
    r = api_server.openai().completions.create(model=api_server.model, prompt=prompt, max_tokens=1, echo=True,
                                                logprobs=2, **GREEDY)
    lp = r.choices[0].logprobs
    n_prompt = r.usage.prompt_tokens
    assert r.choices[0].text.startswith(prompt)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n_prompt + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    scored = lp.token_logprobs[1:n_prompt]
    assert all(x is not None and x <= 0 for x in scored)
    assert math.isfinite(math.exp(-sum(scored) / len(scored)))  # a perplexity
    assert lp.text_offset == sorted(lp.text_offset)


def test_completion_logprobs_streaming(api_server: ServerThread) -> None:
    stream = api_server.openai().completions.create(model=api_server.model, prompt="Hi", max_tokens=5, logprobs=1,
                                                     stream=True, extra_body={"ignore_eos": True}, **GREEDY)
    tokens = [t for c in stream for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]
    assert len(tokens) == 5


def test_seed_makes_sampling_reproducible(api_server: ServerThread) -> None:
    kw = {"max_tokens": 12, "temperature": 0.9, "seed": 1234}
    a = api_server.openai().chat.completions.create(model=api_server.model, messages=CHAT, **kw)
    b = api_server.openai().chat.completions.create(model=api_server.model, messages=CHAT, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_model_may_be_omitted(api_server: ServerThread) -> None:
    with api_server.http() as http:
        r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == api_server.model


def test_prompt_logprobs_vllm_extension(api_server: ServerThread) -> None:
    with api_server.http() as http:
        r = http.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 1, "prompt_logprobs": 1})
    body = r.json()
    plp = body["choices"][0]["prompt_logprobs"]
    assert len(plp) == body["usage"]["prompt_tokens"] and plp[0] is None
    assert all(isinstance(e, dict) and e for e in plp[1:])


def test_concurrent_streams_do_not_mix(api_server: ServerThread) -> None:
    """Requests batched together in the engine each get their own, complete answer."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"Request number {i}:" for i in range(8)]

    def run(prompt: str) -> tuple[str, int]:
        stream = api_server.openai().completions.create(
            model=api_server.model, prompt=prompt, max_tokens=10, stream=True, temperature=0.0,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = list(stream)
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage.completion_tokens

    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(run, prompts))
    assert all(n == 10 for _, n in results)
    if is_fake(api_server):
        assert all(text == SCRIPT[:10] for text, _ in results)
