"""POST /v1/chat/completions."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import Response

from bastion.guard.leak import LeakGuard
from bastion.server.generation import Generation, cancel_on_disconnect, check_not_aborted, run_all, usage_of
from bastion.server.logprobs import TokenTexts, chat_logprobs, vllm_prompt_logprobs
from bastion.server.params import (
    check_against_model,
    encode_chat,
    reject_unsupported,
    resolve_max_tokens,
    sampling_params,
    scheduling_for,
)
from bastion.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
)
from bastion.server.sse import DONE, SSEResponse, error_event, event
from bastion.server.state import ServerState, get_state

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    arrival = time.monotonic()
    state = get_state(request)
    state.ensure_serving()
    reject_unsupported(body)
    served, tenant = state.resolve_for(request, body.model, body.user)
    engine = served.engine
    requested = body.requested_max_tokens()
    check_against_model(body, requested, engine)
    scheduling = scheduling_for(body, tenant, engine)
    prompt_ids = await encode_chat(engine, body)
    max_tokens = resolve_max_tokens(requested, len(prompt_ids), engine.max_model_len,
                                    state.config.max_tokens_default, "messages")
    params = sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs_count(),
                             prompt_logprobs=body.prompt_logprobs)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    state.log_private("%s chat model=%s messages=%r params=%r", request_id, served.id,
                      [m.as_template_dict() for m in body.messages], params)
    filt, guard = state.policy.token_filter(served.adapter, body.cleangen), _guard(body, state)
    lease = state.tenants.admit(tenant, len(prompt_ids))  # 429 over the key's limits
    gen = Generation(engine, prompt_ids, params, request_id, state.metrics.timer(arrival), token_filter=filt,
                     guard=guard, scheduling=scheduling, cache_salt=tenant.cache_salt, lease=lease)
    texts = TokenTexts(engine.tokenizer)

    if body.stream:
        await cancel_on_disconnect(request, gen.start())
        return SSEResponse(_stream(gen, body, served.id, texts, state), on_close=gen.aclose)

    await cancel_on_disconnect(request, run_all([gen]))
    check_not_aborted([gen])
    state.log_private("%s finished (%s): %r", request_id, gen.finish_reason, gen.text)
    choice = ChatChoice(
        message=ChatMessageOut(content=gen.text),
        finish_reason=gen.finish_reason,
        logprobs=chat_logprobs(gen.logprobs, texts, body.top_logprobs or 0) if body.logprobs else None,
        prompt_logprobs=(vllm_prompt_logprobs(prompt_ids, gen.prompt_logprobs, texts)
                         if body.prompt_logprobs is not None else None),
    )
    resp = ChatCompletionResponse(id=request_id, model=served.id, choices=[choice], usage=usage_of([gen]))
    return Response(resp.model_dump_json(), media_type="application/json")


def _guard(body: ChatCompletionRequest, state: ServerState) -> LeakGuard | None:
    """The operator's output guard for this request: its system/developer messages are
    what the leak guard protects (the user's own turns are not secrets)."""
    system = [m.as_template_dict()["content"] for m in body.messages if m.role in ("system", "developer")]
    return state.policy.leak_guard(system)


async def _stream(gen: Generation, body: ChatCompletionRequest, model_id: str, texts: TokenTexts,
                  state: ServerState) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[ChatChunkChoice], **extra: object) -> str:
        return event(ChatCompletionChunk(id=gen.request_id, created=created, model=model_id, choices=choices,
                                         **extra))  # type: ignore[arg-type]

    try:
        # OpenAI's first chunk announces the role with empty content.
        yield chunk([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])
        async with contextlib.aclosing(gen.outputs()) as outs:
            async for out in outs:
                lps = (chat_logprobs(out.new_logprobs, texts, body.top_logprobs or 0)
                       if body.logprobs and out.new_logprobs else None)
                finish = (out.finish_reason or "stop") if out.finished else None
                if out.new_text or lps or finish:
                    delta = ChatDelta(content=out.new_text or None)
                    yield chunk([ChatChunkChoice(delta=delta, logprobs=lps, finish_reason=finish)])
        if body.include_usage_in_stream:
            yield chunk([], usage=usage_of([gen]))
        state.log_private("%s finished (%s): %r", gen.request_id, gen.finish_reason, gen.text)
    except Exception as exc:  # noqa: BLE001 - headers are sent; report inside the stream
        yield error_event(exc, log_requests=state.config.log_requests)
    finally:
        await gen.aclose()
    yield DONE
