"""From a validated request to what the engine takes: prompt token ids and
SamplingParams, with the context-length rules applied.

Length rules (all against the served engine's max_model_len):
* max_tokens > max_model_len is a bad value whatever the prompt: 400;
* prompt + max_tokens > max_model_len: the request cannot fit: 413;
* max_tokens omitted: min(ServerConfig.max_tokens_default, room left in the context),
  and a prompt that leaves no room at all is 413.
"""

from __future__ import annotations

import asyncio
from typing import Any

import jinja2

from bastion.engine.request import Scheduling
from bastion.engine.sampling_params import SamplingParams
from bastion.server.errors import bad_request, context_too_long
from bastion.server.protocol import ChatCompletionRequest, CompletionRequest, _SamplingRequest
from bastion.server.tenants import Tenant


def reject_unsupported(req: ChatCompletionRequest | CompletionRequest) -> None:
    problem = req.unsupported()
    if problem is not None:
        param, message = problem
        raise bad_request(message, param=param, code="unsupported_parameter")


def check_against_model(req: _SamplingRequest, requested_max_tokens: int | None, engine: Any) -> None:
    """The bounds that depend on the served model: context length and vocabulary size."""
    if requested_max_tokens is not None and requested_max_tokens > engine.max_model_len:
        raise bad_request(f"max_tokens ({requested_max_tokens}) exceeds the model's context length "
                          f"({engine.max_model_len}).", param="max_tokens")
    vocab = engine.vocab_size
    if req.top_k is not None and req.top_k > vocab:
        raise bad_request(f"top_k ({req.top_k}) exceeds the vocabulary size ({vocab}); -1 or 0 disables it.",
                          param="top_k")
    bad = [t for t in req.stop_token_ids or () if t >= vocab]
    if bad:
        raise bad_request(f"stop_token_ids: {bad[0]} is not a token id (vocabulary size {vocab}).",
                          param="stop_token_ids")


def scheduling_for(req: _SamplingRequest, tenant: Tenant, engine: Any) -> Scheduling:
    """The request's priority and tenant for the engine's scheduler. As in vLLM, a
    priority other than 0 is refused unless the server schedules by priority."""
    policy = getattr(engine, "scheduling_policy", "fcfs")
    if req.priority != 0 and policy != "priority":
        raise bad_request(f"priority is only used with --scheduling-policy priority (this server: {policy}); "
                          "send 0 or omit it.", param="priority")
    return tenant.scheduling(req.priority)


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int, default: int,
                       prompt_param: str) -> int:
    room = max_model_len - prompt_len
    if room < 1:
        raise context_too_long(
            f"The prompt is {prompt_len} tokens but the model's context length is {max_model_len} tokens, "
            "leaving no room to generate.", prompt_param)
    if requested is None:
        return min(default, room)
    if requested > room:
        raise context_too_long(
            f"This request needs {prompt_len + requested} tokens ({prompt_len} in the prompt + {requested} "
            f"max_tokens) but the model's context length is {max_model_len} tokens.", prompt_param)
    return requested


# NOTE: tokenizing runs in a worker thread (HF's Rust tokenizer releases the GIL): a long
# prompt must not stall the event loop, which serves /health and every other stream.
async def encode_chat(engine: Any, req: ChatCompletionRequest) -> list[int]:
    try:
        ids = await asyncio.to_thread(engine.encode_chat, [m.as_template_dict() for m in req.messages])
    except (ValueError, TypeError, jinja2.TemplateError) as exc:
        # Chat templates reject e.g. non-alternating roles by raising TemplateError.
        raise bad_request(f"Invalid messages: {exc}", param="messages") from None
    return _non_empty(list(ids), "messages")


async def encode_prompt(engine: Any, prompt: str | list[int]) -> list[int]:
    try:
        ids = await asyncio.to_thread(engine.encode_prompt, prompt)
    except (ValueError, TypeError) as exc:
        raise bad_request(f"Invalid prompt: {exc}", param="prompt") from None
    return _non_empty(list(ids), "prompt")


def _non_empty(ids: list[int], param: str) -> list[int]:
    if not ids:
        raise bad_request("The prompt is empty after tokenization.", param=param)
    return ids


def sampling_params(req: _SamplingRequest, *, max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None) -> SamplingParams:
    """Build SamplingParams; its own checks (e.g. min_tokens <= max_tokens) become 400s."""
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k is None else req.top_k,
            seed=req.seed,
            stop=tuple(req.stop_list()),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            include_stop_str_in_output=req.include_stop_str_in_output,
        )
    except ValueError as exc:
        # SamplingParams messages start with the field name ("top_p must be ...").
        raise bad_request(str(exc), param=str(exc).split(" ", 1)[0]) from None
