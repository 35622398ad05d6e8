"""AsyncEngine: runs LLMEngine.step() in a loop thread and streams per-request deltas to
asyncio consumers (the HTTP server, `bastion chat`).

Only the loop thread touches the engine. Callers talk to it through typed commands
(serving/commands.py), and results come back through `loop.call_soon_threadsafe`.
Torch releases the GIL inside kernels, so the event loop stays responsive.

The AsyncEngine applies no policy: a request's adapter and token filter (e.g. CleanGen,
chosen by serving/policy.py) come with it, and adapters are vetted before `load_adapter`.

NOTE: with 2 OpenMP threads, stepping the engine from a non-main Python thread measured
~2x slower per token on the 2-core CPU (33 ms vs 18 ms, torch 2.13 / libgomp, no
asyncio involved). `bastion serve` therefore runs the loop on the main thread
(`background=False` + `run_loop()`) and the HTTP server on a secondary one; tests and
embedders get the background thread by default.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from bastion.config import Config
from bastion.engine.llm_engine import LLMEngine
from bastion.engine.outputs import (
    EngineDeadError,
    EngineStats,
    PromptTooLongError,
    QueueFullError,
    RequestFailedError,
    RequestOutput,
)
from bastion.engine.request import Scheduling, TokenFilter
from bastion.engine.sampling_params import SamplingParams
from bastion.serving.chat_template import encode_chat
from bastion.serving.commands import Abort, AddRequest, CallInEngine, Command
from bastion.serving.output_processor import OutputProcessor
from bastion.serving.tokenizer import load_engine
from bastion.serving.views import AdapterView

log = logging.getLogger("bastion.engine")


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    q: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine, tokenizer, model_name: str, background: bool = True):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.max_model_len = engine.max_model_len
        self.processor = OutputProcessor(engine, tokenizer)
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._accepting = True
        self._stopped = False
        self._dead: BaseException | None = None
        self._step_since: float | None = None  # monotonic start of the step in progress
        self._thread = threading.Thread(target=self._run, name="bastion-engine", daemon=True)
        self._loop_done = threading.Event()
        if background:
            self._thread.start()

    @classmethod
    def from_config(cls, config: Config, show_progress: bool = True, background: bool = True) -> "AsyncEngine":
        engine, tokenizer, name = load_engine(config, show_progress)
        return cls(engine, tokenizer, config.model.served_name or name, background=background)

    def run_loop(self) -> None:
        """Run the engine loop in the calling thread until shutdown (background=False)."""
        self._run()

    # ------------------------------------------------------------ tokenization
    def encode_chat(self, messages: list[dict]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        if any(t < 0 or t >= self.engine.vocab_size for t in ids):
            raise ValueError(f"token ids must be in [0, {self.engine.vocab_size})")
        return ids

    # ------------------------------------------------------------ requests
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None, adapter: str | None = None,
                       token_filter: TokenFilter | None = None, scheduling: Scheduling | None = None,
                       cache_salt: str = "") -> AsyncIterator[RequestOutput]:
        """Stream deltas. Raises QueueFullError / PromptTooLongError / EngineDeadError /
        ValueError before yielding. Closing the iterator early aborts the request.
        `scheduling`: priority and tenant for the scheduler; `cache_salt`: the request's
        prefix-cache namespace (LLMEngine.add_request)."""
        rid = request_id or uuid.uuid4().hex
        self._check_admission(prompt_token_ids)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[rid] = stream
        self._send(AddRequest(rid, list(prompt_token_ids), params, adapter, token_filter, scheduling, cache_salt))
        finished = False
        try:
            while True:
                item = await stream.q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:  # consumer went away (client disconnect, cancel): free KV now
                self.abort(rid)

    def _check_admission(self, prompt: list[int]) -> None:
        if self._dead is not None or self._stopped or not self._accepting:
            raise EngineDeadError("engine is shutting down" if self._dead is None else f"engine failed: {self._dead}")
        if len(self.engine.scheduler.waiting) + self._commands.qsize() >= self.engine.config.scheduler.max_waiting:
            raise QueueFullError("too many requests are waiting; retry later")
        if len(prompt) >= self.max_model_len:
            raise PromptTooLongError(f"prompt has {len(prompt)} tokens; the context holds {self.max_model_len}")

    @property
    def scheduling_policy(self) -> str:
        """fcfs, priority or fair (SchedulerConfig.policy): the server checks `priority` by it."""
        return self.engine.config.scheduler.policy

    def abort(self, request_id: str) -> None:
        self._send(Abort(request_id))

    def _send(self, command: Command) -> None:
        self._commands.put(command)
        self._wake.set()

    # ------------------------------------------------------------ adapters
    async def call_in_engine(self, fn):
        """Run fn(engine) on the engine thread between two steps (state changes such as
        loading an adapter must not race a forward pass)."""
        if not self.is_running:
            raise EngineDeadError("engine is not running")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._send(CallInEngine(fn, fut))
        return await asyncio.wrap_future(fut)

    def _require_adapters(self) -> None:
        if self.engine.adapters is None:
            raise ValueError("LoRA serving is not enabled (start with --lora or --enable-lora)")

    async def load_adapter(self, name: str, path: str) -> None:
        """Load an adapter (already vetted: serving/policy.py) between two steps."""
        self._require_adapters()
        await self.call_in_engine(lambda eng: eng.adapters.load(name, path))

    def load_adapter_before_start(self, name: str, path: str) -> None:
        """Synchronous load for start-up (--lora), before the loop runs."""
        self._require_adapters()
        self.engine.adapters.load(name, path)

    async def unload_adapter(self, name: str) -> None:
        await self.call_in_engine(lambda eng: eng.unload_adapter(name))

    @property
    def lora_slot_rank(self) -> int | None:
        """The rank of the adapter slots (fixed at start), None without adapters."""
        return self.engine.adapters.config.max_lora_rank if self.engine.adapters else None

    def adapter_names(self) -> list[str]:
        return list(self.engine.adapters.slot_of) if self.engine.adapters else []

    def with_adapter(self, name: str) -> AdapterView:
        return AdapterView(self, name)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def is_running(self) -> bool:
        """False once the loop stopped (shutdown) or crashed; /health reports it."""
        return self._dead is None and not self._stopped and not self._loop_done.is_set()

    @property
    def failure(self) -> BaseException | None:
        """What killed the engine loop, if it crashed (the server then exits non-zero)."""
        return self._dead

    def health(self, stall_after_s: float) -> str | None:
        """None when serving; else why not: the loop is dead, or one step has been
        running for longer than stall_after_s (wedged)."""
        if self._dead is not None:
            return f"engine loop crashed ({type(self._dead).__name__})"
        if not self.is_running:
            return "engine stopped"
        since = self._step_since
        if since is not None and time.monotonic() - since > stall_after_s:
            return f"engine step running for {time.monotonic() - since:.0f} s"
        return None

    # ------------------------------------------------------------ the thread
    def _deliver(self, rid: str, item) -> None:
        s = self._streams.get(rid)
        if s is not None:
            s.loop.call_soon_threadsafe(s.q.put_nowait, item)

    def _deliver_output(self, out: RequestOutput) -> None:
        try:
            out = self.processor.process(out)
        except Exception as exc:  # noqa: BLE001 - e.g. a detokenizer failure: this request only
            log.error("request %s: output processing failed (%s)", out.request_id, type(exc).__name__, exc_info=exc)
            self.engine.abort_request(out.request_id)
            self.processor.drop(out.request_id)
            out = RequestOutput(out.request_id, out.prompt_token_ids, finished=True, finish_reason="error",
                                error=f"{type(exc).__name__}: {exc}")
        if out.finish_reason == "error":
            self._deliver(out.request_id, RequestFailedError(out.error or "the engine failed this request"))
        else:
            self._deliver(out.request_id, out)

    def _execute(self, cmd: Command) -> None:
        if isinstance(cmd, AddRequest):
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params, adapter=cmd.adapter,
                                        token_filter=cmd.token_filter, scheduling=cmd.scheduling,
                                        cache_salt=cmd.cache_salt)
                self.processor.register(cmd.request_id, cmd.params)
            except Exception as e:  # noqa: BLE001 - bad request: report to that caller only
                self._deliver(cmd.request_id, e)
        elif isinstance(cmd, Abort):
            if self.engine.abort_request(cmd.request_id):
                self.processor.drop(cmd.request_id)
                self._deliver(cmd.request_id, RequestOutput(cmd.request_id, [], finished=True, finish_reason="abort"))
        else:
            try:
                cmd.future.set_result(cmd.fn(self.engine))
            except Exception as e:  # noqa: BLE001 - the caller gets it
                cmd.future.set_exception(e)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            self._execute(cmd)

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._loop_done.set()

    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._drain_commands()
                if not self.engine.has_unfinished():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                self._step_since = time.monotonic()
                outputs = self.engine.step()
                self._step_since = None
                for out in outputs:
                    self._deliver_output(out)
        except BaseException as e:  # engine bug or OOM: fail every caller, don't hang them
            log.exception("engine loop crashed")
            self._dead = e
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"engine failed: {e}"))

    def stop(self) -> None:
        """Stop the loop now, from any thread, without draining (for a server that never
        started: its graceful `shutdown` did not run). Idempotent."""
        self._accepting = False
        self._stopped = True
        self._wake.set()

    async def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop admitting; let in-flight requests finish for up to grace_s; abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self.engine.has_unfinished() and time.monotonic() < deadline and self._dead is None:
            await asyncio.sleep(0.05)
        for rid in list(self.engine.requests):
            self.abort(rid)
        await asyncio.sleep(0.1)  # let aborts reach their streams
        self._stopped = True
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._loop_done.wait, 5.0)
