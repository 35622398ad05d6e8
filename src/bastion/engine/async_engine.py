"""AsyncEngine: runs LLMEngine.step() in a background thread and streams per-request
deltas to asyncio consumers (the HTTP server, `bastion chat`).

Only the engine thread touches the engine. Callers talk to it through a command
queue (add / abort), and results come back through `loop.call_soon_threadsafe`.
Torch releases the GIL inside kernels, so the event loop stays responsive.

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
from bastion.engine.llm import OutputProcessor
from bastion.engine.llm_engine import LLMEngine
from bastion.engine.outputs import (
    EngineDeadError, EngineStats, PromptTooLongError, QueueFullError, RequestFailedError, RequestOutput,
)
from bastion.engine.sampling_params import SamplingParams

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
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._accepting = True
        self.gate = None  # adapters.gate.VettingGate: every adapter load is scanned first
        self.cleangen: dict[str, float] = {}  # adapter -> alpha: CleanGen on by default (--cleangen)
        self._stopped = False
        self._dead: BaseException | None = None
        self._step_since: float | None = None  # monotonic start of the step in progress
        self._thread = threading.Thread(target=self._run, name="bastion-engine", daemon=True)
        self._loop_done = threading.Event()
        if background:
            self._thread.start()

    @classmethod
    def from_config(cls, config: Config, show_progress: bool = True, background: bool = True) -> "AsyncEngine":
        engine, tokenizer, name = LLMEngine.from_config(config, show_progress)
        return cls(engine, tokenizer, config.model.served_name or name, background=background)

    def run_loop(self) -> None:
        """Run the engine loop in the calling thread until shutdown (background=False)."""
        self._run()

    # ------------------------------------------------------------ tokenization helpers
    def encode_chat(self, messages: list[dict]) -> list[int]:
        if not messages:
            raise ValueError("messages must not be empty")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool", "developer"):
                raise ValueError(f"invalid message: {str(m)[:80]}")
            if not isinstance(m.get("content", ""), str):
                raise ValueError("message content must be a string")
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # template errors are the caller's input problem
            raise ValueError(f"chat template failed: {e}") from e
        if hasattr(ids, "keys"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)

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
    @property
    def supports_cleangen(self) -> bool:
        """CleanGen's reference track needs a full-precision KV cache."""
        return self.engine.kv_cache.num_seq_slots is None

    def token_filter(self, adapter: str | None, cleangen: bool | None):
        """The CleanGen filter for a request: its explicit choice, else the adapter's policy."""
        on = (adapter in self.cleangen) if cleangen is None else cleangen
        if not on:
            return None
        from bastion.guard.cleangen import DEFAULT_ALPHA, CleanGen

        return CleanGen(alpha=self.cleangen.get(adapter, DEFAULT_ALPHA))

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None, adapter: str | None = None,
                       cleangen: bool | None = None) -> AsyncIterator[RequestOutput]:
        """Stream deltas. Raises QueueFullError / PromptTooLongError / EngineDeadError /
        ValueError before yielding. Closing the iterator early aborts the request.
        `cleangen`: defend this request (True), not (False), or the adapter's policy (None)."""
        rid = request_id or uuid.uuid4().hex
        self._check_admission(prompt_token_ids, params)
        filt = self.token_filter(adapter, cleangen)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[rid] = stream
        self._commands.put(("add", rid, list(prompt_token_ids), params, adapter, filt))
        self._wake.set()
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

    def _check_admission(self, prompt: list[int], params: SamplingParams) -> None:
        if self._dead is not None or self._stopped or not self._accepting:
            raise EngineDeadError("engine is shutting down" if self._dead is None else f"engine failed: {self._dead}")
        if len(self.engine.scheduler.waiting) + self._commands.qsize() >= self.engine.config.scheduler.max_waiting:
            raise QueueFullError("too many requests are waiting; retry later")
        if len(prompt) >= self.max_model_len:
            raise PromptTooLongError(f"prompt has {len(prompt)} tokens; the context holds {self.max_model_len}")

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    # ------------------------------------------------------------ adapters
    async def call_in_engine(self, fn):
        """Run fn(engine) on the engine thread between two steps (state changes such as
        loading an adapter must not race a forward pass)."""
        if not self.is_running:
            raise EngineDeadError("engine is not running")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("call", fn, fut))
        self._wake.set()
        return await asyncio.wrap_future(fut)

    async def load_adapter(self, name: str, path: str):
        """Vet (when a gate is set) then load; returns the scan report or None."""
        if self.engine.adapters is None:
            raise ValueError("LoRA serving is not enabled (start with --lora or --enable-lora)")
        report = None
        if self.gate is not None:  # scanning reads and hashes files: keep it off the loop
            report = await asyncio.get_running_loop().run_in_executor(None, self.gate.check, name, path)
        await self.call_in_engine(lambda eng: eng.adapters.load(name, path))
        return report

    def load_adapter_before_start(self, name: str, path: str):
        """Synchronous load for start-up (--lora), before the loop runs; vetted likewise."""
        if self.engine.adapters is None:
            raise ValueError("LoRA serving is not enabled")
        report = self.gate.check(name, path) if self.gate is not None else None
        self.engine.adapters.load(name, path)
        return report

    async def unload_adapter(self, name: str) -> None:
        await self.call_in_engine(lambda eng: eng.unload_adapter(name))

    def adapter_names(self) -> list[str]:
        return list(self.engine.adapters.slot_of) if self.engine.adapters else []

    def with_adapter(self, name: str) -> "AdapterView":
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

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "call":  # run fn(engine) between steps; result to a Future
                _, fn, fut = cmd
                try:
                    fut.set_result(fn(self.engine))
                except Exception as e:
                    fut.set_exception(e)
            elif cmd[0] == "add":
                _, rid, ids, params, adapter, filt = cmd
                try:
                    self.engine.add_request(rid, ids, params, adapter=adapter, token_filter=filt)
                    self.processor.register(rid, params)
                except Exception as e:  # bad request: report to that caller only
                    self._deliver(rid, e)
            elif cmd[0] == "abort":
                if self.engine.abort_request(cmd[1]):
                    self.processor.drop(cmd[1])
                    self._deliver(cmd[1], RequestOutput(cmd[1], [], finished=True, finish_reason="abort"))

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


class AdapterView:
    """The AsyncEngine as seen through one adapter: same interface, every request runs
    with that adapter. The server serves one per adapter under the adapter's name."""

    def __init__(self, base: AsyncEngine, adapter: str):
        self.base, self.adapter, self.model_name = base, adapter, adapter

    def __getattr__(self, name):  # tokenizer, max_model_len, encode_*, abort, stats, ...
        return getattr(self.base, name)

    def generate(self, prompt_token_ids, params, request_id=None, cleangen=None):
        return self.base.generate(prompt_token_ids, params, request_id, adapter=self.adapter, cleangen=cleangen)
