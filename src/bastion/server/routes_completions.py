"""POST /v1/completions (text in, text out; echo + logprobs for perplexity)."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import Response

from bastion.server.generation import Generation, cancel_on_disconnect, check_not_aborted, run_all, usage_of
from bastion.server.logprobs import (
    CompletionLogprobBuilder,
    TokenTexts,
    concat,
    prompt_entries,
    vllm_prompt_logprobs,
)
from bastion.server.params import (
    check_against_model,
    encode_prompt,
    reject_unsupported,
    resolve_max_tokens,
    sampling_params,
    scheduling_for,
)
from bastion.server.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from bastion.server.sse import DONE, SSEResponse, error_event, event
from bastion.server.state import ServerState, get_state

router = APIRouter()


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    arrival = time.monotonic()
    state = get_state(request)
    state.ensure_serving()
    reject_unsupported(body)
    served, tenant = state.resolve_for(request, body.model, body.user)
    engine = served.engine
    check_against_model(body, body.max_tokens, engine)
    scheduling = scheduling_for(body, tenant, engine)
    prompts = body.prompts()
    id_lists = [await encode_prompt(engine, p) for p in prompts]
    # echo + logprobs means "score the prompt too": ask the engine for prompt logprobs.
    prompt_lp = body.prompt_logprobs
    if body.echo and body.logprobs is not None:
        prompt_lp = max(prompt_lp or 0, body.logprobs)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    gens = []
    filt = state.policy.token_filter(served.adapter, body.cleangen)
    # every 400/413 before the tenant is charged; nothing between admit() and the
    # Generations that own the lease can raise
    plist = [sampling_params(body, max_tokens=resolve_max_tokens(body.max_tokens, len(ids), engine.max_model_len,
                                                                 state.config.max_tokens_default, "prompt"),
                             logprobs=body.logprobs, prompt_logprobs=prompt_lp) for ids in id_lists]
    lease = state.tenants.admit(tenant, sum(map(len, id_lists)), parts=len(id_lists))  # 429 over its limits
    for i, (ids, params) in enumerate(zip(id_lists, plist)):
        rid = request_id if len(id_lists) == 1 else f"{request_id}-{i}"
        gens.append(Generation(engine, ids, params, rid, state.metrics.timer(arrival), token_filter=filt,
                               guard=state.policy.leak_guard(),  # canaries only: no system prompt
                               scheduling=scheduling, cache_salt=tenant.cache_salt, lease=lease))
    state.log_private("%s completion model=%s prompts=%r params=%r", request_id, served.id, prompts,
                      gens[0].params)
    texts = TokenTexts(engine.tokenizer)
    # Echo the prompt as the client sent it; token-id prompts are decoded.
    echoes = [p if isinstance(p, str) else engine.tokenizer.decode(ids) for p, ids in zip(prompts, id_lists)]

    if body.stream:
        await cancel_on_disconnect(request, gens[0].start())
        return SSEResponse(_stream(gens[0], body, served.id, texts, echoes[0], state), on_close=gens[0].aclose)

    await cancel_on_disconnect(request, run_all(gens))
    check_not_aborted(gens)
    choices = [_choice(i, g, body, texts, echoes[i]) for i, g in enumerate(gens)]
    state.log_private("%s finished: %r", request_id, [c.text for c in choices])
    resp = CompletionResponse(id=request_id, model=served.id, choices=choices, usage=usage_of(gens))
    return Response(resp.model_dump_json(), media_type="application/json")


def _choice(index: int, gen: Generation, body: CompletionRequest, texts: TokenTexts,
            echo_text: str) -> CompletionChoice:
    prefix = echo_text if body.echo else ""
    logprobs = None
    if body.logprobs is not None:
        builder = CompletionLogprobBuilder(texts, body.logprobs)
        logprobs = CompletionLogprobs()
        if body.echo:
            logprobs = builder.build(prompt_entries(gen.prompt_ids, gen.prompt_logprobs))
            # Generated offsets count from the echoed text (never backwards, should
            # single-token decodes be longer than the text, e.g. split UTF-8).
            builder.offset = max(builder.offset, len(prefix))
        logprobs = concat(logprobs, builder.build(list(zip(gen.token_ids, gen.logprobs))))
    return CompletionChoice(
        index=index,
        text=prefix + gen.text,
        logprobs=logprobs,
        finish_reason=gen.finish_reason,
        prompt_logprobs=(vllm_prompt_logprobs(gen.prompt_ids, gen.prompt_logprobs, texts)
                         if body.prompt_logprobs is not None else None),
    )


async def _stream(gen: Generation, body: CompletionRequest, model_id: str, texts: TokenTexts, echo_text: str,
                  state: ServerState) -> AsyncIterator[str]:
    created = int(time.time())
    builder = CompletionLogprobBuilder(texts, body.logprobs) if body.logprobs is not None else None

    def chunk(choices: list[CompletionChoice], **extra: object) -> str:
        return event(CompletionResponse(id=gen.request_id, created=created, model=model_id, choices=choices,
                                        **extra))  # type: ignore[arg-type]

    try:
        first = True
        async with contextlib.aclosing(gen.outputs()) as outs:
            async for out in outs:
                if first and (body.echo or body.prompt_logprobs is not None):
                    # The prompt's logprobs arrive with the first output, so the echo
                    # chunk is sent then, ahead of the first generated text.
                    lps = None
                    if body.echo and builder is not None:
                        lps = builder.build(prompt_entries(gen.prompt_ids, out.prompt_logprobs))
                        builder.offset = max(builder.offset, len(echo_text))
                    plp = (vllm_prompt_logprobs(gen.prompt_ids, out.prompt_logprobs, texts)
                           if body.prompt_logprobs is not None else None)
                    text = echo_text if body.echo else ""
                    yield chunk([CompletionChoice(text=text, logprobs=lps, prompt_logprobs=plp)])
                first = False
                lps = None
                if builder is not None and out.new_logprobs:
                    lps = builder.build(list(zip(out.new_token_ids, out.new_logprobs)))
                finish = (out.finish_reason or "stop") if out.finished else None
                if out.new_text or lps or finish:
                    yield chunk([CompletionChoice(text=out.new_text, logprobs=lps, finish_reason=finish)])
        if body.include_usage_in_stream:
            yield chunk([], usage=usage_of([gen]))
        state.log_private("%s finished (%s): %r", gen.request_id, gen.finish_reason, gen.text)
    except Exception as exc:  # noqa: BLE001 - headers are sent; report inside the stream
        yield error_event(exc, log_requests=state.config.log_requests)
    finally:
        await gen.aclose()
    yield DONE
