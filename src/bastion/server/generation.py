"""One engine request as the server drives it, and client-disconnect handling.

The engine's `generate()` raises its admission errors (queue full, prompt too long,
engine dead) when the first output is awaited, so `Generation.start()` awaits that
first output *before* any response header is sent; that is what lets a streaming
request still be answered 429/413/503 instead of a 200 with an error inside.

Cancellation contract: closing the engine's async generator aborts the request and
frees its KV blocks. Every path out of a Generation (finished, client gone, server
error, cancellation) therefore ends in `aclose()`, which is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request

from bastion.engine.outputs import EngineError, RequestOutput
from bastion.engine.request import Scheduling, TokenFilter
from bastion.engine.sampling_params import SamplingParams, TokenLogprob
from bastion.guard.leak import FILTERED, LeakGuard, guard_outputs
from bastion.server.errors import ClientDisconnected, from_engine_error, unavailable
from bastion.server.metrics import RequestTimer
from bastion.server.protocol import Usage

T = TypeVar("T")
logger = logging.getLogger("bastion.server")


class Generation:
    """Runs one prompt through the engine and accumulates what came back."""

    def __init__(self, engine: Any, prompt_ids: list[int], params: SamplingParams, request_id: str,
                 timer: RequestTimer, token_filter: TokenFilter | None = None, guard: LeakGuard | None = None,
                 scheduling: Scheduling | None = None, cache_salt: str = "", lease: Any = None) -> None:
        self.engine = engine
        self.scheduling, self.cache_salt = scheduling, cache_salt  # priority/tenant; the tenant's cache namespace
        self._lease = lease  # tenants.Lease: the tenant's slot, given back by aclose()
        self.token_filter = token_filter  # e.g. CleanGen, chosen by the serving policy
        self.guard = guard  # output guard: holds back text, may end the answer ("content_filter")
        self.prompt_ids = prompt_ids
        self.params = params
        self.request_id = request_id
        self._timer = timer
        self._gen: Any = None  # the engine's async generator while it is open
        self._first: RequestOutput | None = None
        self._admitted = False  # the engine accepted it (yielded a first output)
        # Accumulated result (non-streaming responses and usage read these).
        self.text_parts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.finish_reason: str | None = None
        self.num_generated = 0
        self.num_cached_prompt = 0
        self.num_replaced: int | None = None  # CleanGen replacements (None: not defended)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    async def start(self) -> None:
        """Submit to the engine and wait for the first output; engine errors -> APIError."""
        try:
            kw: dict[str, Any] = {} if self.token_filter is None else {"token_filter": self.token_filter}
            if self.scheduling is not None:
                kw["scheduling"] = self.scheduling
            if self.cache_salt:
                kw["cache_salt"] = self.cache_salt
            gen = self.engine.generate(self.prompt_ids, self.params, self.request_id, **kw)
            if inspect.isawaitable(gen):  # tolerate `async def` returning an iterator
                gen = await gen
            self._gen = gen
            self._first = await gen.__anext__()
            self._admitted = True
        except EngineError as exc:
            await self.aclose()
            raise from_engine_error(exc) from None
        except StopAsyncIteration:
            await self.aclose()
            raise RuntimeError("engine ended a request without any output") from None
        except BaseException:
            await self.aclose()  # cancelled while queued: the request must not linger
            raise
        self._timer.prompt(len(self.prompt_ids))

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """The deltas, starting with the one `start()` fetched (through the output guard,
        if any). Closes the engine generator on the way out, whether finished, broken off,
        cut by the guard or failed."""
        assert self._gen is not None or self._first is not None, "start() first"
        source = self._engine_outputs()
        try:
            async with contextlib.aclosing(guard_outputs(source, self.guard) if self.guard else source) as outs:
                async for out in outs:
                    self._observe(out)
                    yield out
                    if out.finished:
                        return
        finally:
            await source.aclose()
            await self.aclose()

    async def _engine_outputs(self) -> AsyncIterator[RequestOutput]:
        out, self._first = self._first, None
        while out is not None:
            yield out
            if out.finished:
                return
            try:
                out = await self._gen.__anext__()
            except StopAsyncIteration:
                raise RuntimeError("engine stream ended without a finished output") from None
            except EngineError as exc:
                raise from_engine_error(exc) from None

    async def drain(self) -> None:
        async with contextlib.aclosing(self.outputs()) as outs:
            async for _ in outs:
                pass

    async def aclose(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.close_one(self.num_generated)
        gen, self._gen = self._gen, None
        if gen is None:
            return
        if self._admitted and not self.finished:
            self._timer.cancelled()  # (refused requests are counted as rejections instead)
        # Unfinished: closing makes the engine abort the request and free its blocks.
        # Finished: the generator is parked after its last yield; closing it now
        # rather than at garbage collection releases it deterministically.
        aclose = getattr(gen, "aclose", None)
        if aclose is not None:
            await aclose()
        elif not self.finished:  # a plain async iterator: no close protocol, abort by id
            self.engine.abort(self.request_id)

    def _observe(self, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.text_parts.append(out.new_text)
        self.token_ids.extend(out.new_token_ids)
        if out.new_logprobs:
            self.logprobs.extend(out.new_logprobs)
        self.num_generated = max(out.num_generated_tokens, len(self.token_ids))
        self.num_cached_prompt = max(self.num_cached_prompt, out.num_cached_prompt_tokens)
        if getattr(out, "num_replaced_tokens", None) is not None:
            self.num_replaced = out.num_replaced_tokens
        self._timer.tokens(len(out.new_token_ids))
        if out.finished:
            self.finish_reason = out.finish_reason or "stop"
            self._timer.finished(self.finish_reason)
            if self.finish_reason == FILTERED:  # the content stays private; the event does not
                logger.warning("%s: answer cut by the output guard (%s leak)", self.request_id,
                               getattr(self.guard, "tripped", None))


def usage_of(gens: list[Generation]) -> Usage:
    prompt = sum(len(g.prompt_ids) for g in gens)
    completion = sum(g.num_generated for g in gens)
    cached = sum(g.num_cached_prompt for g in gens)
    replaced = [g.num_replaced for g in gens if g.num_replaced is not None]
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details={"cached_tokens": cached},
                 cleangen_replaced_tokens=sum(replaced) if replaced else None)


def check_not_aborted(gens: list[Generation]) -> None:
    """A non-streaming request the engine aborted (shutdown) has no usable answer."""
    if any(g.finish_reason == "abort" for g in gens):
        raise unavailable("The request was aborted before it finished (the server is shutting down); retry.")


async def run_all(gens: list[Generation]) -> None:
    """Start every generation concurrently (the engine batches them), then drain them.
    If any fails, all are closed and the first error is raised."""
    try:
        results = await asyncio.gather(*(g.start() for g in gens), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        await asyncio.gather(*(g.drain() for g in gens))
    finally:
        for g in gens:
            await g.aclose()


async def _wait_for_disconnect(request: Request) -> None:
    # The body was already read by FastAPI, so the next ASGI message can only be
    # http.disconnect (uvicorn also sends it once the response is complete).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (then raise
    ClientDisconnected). Starlette only does this for streaming bodies; without it a
    client that gives up on a long non-streaming request would keep the engine busy."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # The task's own finally blocks close the engine generators; wait for them.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
