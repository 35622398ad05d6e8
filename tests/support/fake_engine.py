"""A deterministic stand-in for bastion.engine.AsyncEngine, for server tests.

It implements the AsyncEngine interface the server relies on (model_name,
max_model_len, tokenizer, encode_chat, encode_prompt, generate, abort, stats,
shutdown) with a byte-level tokenizer and a scripted "model":

* greedy (temperature 0) or any unseeded request generates SCRIPT byte by byte, then
  EOS (finish "stop"); with ignore_eos it starts SCRIPT again; max_tokens -> "length";
* a seeded request at temperature > 0 emits a seed-dependent shuffle of SCRIPT's words;
* stop strings and stop_token_ids behave like the real sampler (stop text trimmed,
  partial matches held back while streaming);
* logprobs / prompt_logprobs are fixed functions of position, so tests can check them.

Test knobs (set from the test thread; plain attribute writes):
* `inject(exc)`: the next generate() raises exc before yielding;
* `token_delay_s`: sleep between tokens (makes streams slow enough to cut off).
Observations: `closed_early` (ids whose generator was closed before finishing),
`aborted` (ids passed to abort()), `stats()` (running requests and KV blocks in use).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator

from bastion.engine.outputs import EngineDeadError, EngineStats, PromptTooLongError, RequestOutput
from bastion.engine.sampling_params import SamplingParams, TokenLogprob

SCRIPT = "Hello! I am a fake engine. The quick brown fox jumps over the lazy dog."
BLOCK_SIZE = 16


class ByteTokenizer:
    """Ids 0..2 are <pad>, <s>, </s>; byte b is id b + 3."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    _SPECIAL = {0: "<pad>", 1: "<s>", 2: "</s>"}
    vocab_size = 259
    all_special_ids = [0, 1, 2]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if i >= 3:
                buf.append(i - 3)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens:
                out.append(self._SPECIAL[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = True) -> list[int] | str:
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<|assistant|>"
        return self.encode(text, add_special_tokens=True) if tokenize else text


def _fake_logprob(position: int, token_id: int, n: int) -> TokenLogprob:
    lp = -0.1 * (position % 7 + 1)
    top = [(token_id, lp)] + [((token_id + k) % 256 + 3, lp - k) for k in range(1, n)]
    return TokenLogprob(token_id=token_id, logprob=lp, rank=1, top=top[:n])


class FakeEngine:
    def __init__(self, model_name: str = "fake-model", max_model_len: int = 256) -> None:
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tokenizer = ByteTokenizer()
        self.vocab_size = self.tokenizer.vocab_size
        self.token_delay_s = 0.0
        self.closed_early: list[str] = []
        self.aborted: list[str] = []
        self.shutdown_calls: list[float] = []
        self._injected: list[BaseException] = []
        self.submitted: list[tuple] = []  # (request id, Scheduling, cache salt) per generate()
        self.scheduling_policy = "fcfs"
        self._running: dict[str, int] = {}  # request id -> tokens held in "KV cache"
        self._abort_requested: set[str] = set()
        self._dead = False
        self._prompt_total = 0
        self._gen_total = 0

    # ------------------------------------------------------------------ interface
    def encode_chat(self, messages: list[dict]) -> list[int]:
        for m in messages:
            if m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
                raise ValueError(f"unknown role {m.get('role')!r}")
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        bad = [t for t in prompt if not 0 <= t < self.tokenizer.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {self.tokenizer.vocab_size})")
        return list(prompt)

    def inject(self, exc: BaseException) -> None:
        self._injected.append(exc)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str, scheduling=None, cache_salt: str = "") -> AsyncIterator[RequestOutput]:
        self.submitted.append((request_id, scheduling, cache_salt))  # what the server asked the scheduler for
        if self._injected:
            raise self._injected.pop(0)
        if self._dead:
            raise EngineDeadError("engine is shut down")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLongError(f"{len(prompt_token_ids)} + {params.max_tokens} > {self.max_model_len}")
        self._running[request_id] = len(prompt_token_ids)
        self._prompt_total += len(prompt_token_ids)
        finished = False
        try:
            async for out in self._run(prompt_token_ids, params, request_id):
                finished = out.finished
                yield out
        finally:
            # Whatever way we leave (finished, aclose(), cancellation) the "blocks" go.
            if not finished:
                self.closed_early.append(request_id)
            self._running.pop(request_id, None)
            self._abort_requested.discard(request_id)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        if request_id in self._running:
            self._abort_requested.add(request_id)

    def stats(self) -> EngineStats:
        used = sum(math.ceil(n / BLOCK_SIZE) for n in self._running.values())
        return EngineStats(num_waiting=0, num_running=len(self._running), kv_blocks_total=1024,
                           kv_blocks_used=used, num_preemptions=0, prompt_tokens_total=self._prompt_total,
                           generation_tokens_total=self._gen_total)

    async def shutdown(self, grace_s: float) -> None:
        self.shutdown_calls.append(grace_s)
        self._dead = True
        deadline = asyncio.get_running_loop().time() + grace_s
        while self._running and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        for rid in list(self._running):
            self.abort(rid)
        while self._running:
            await asyncio.sleep(0.01)

    def revive(self) -> None:
        """Test helper: undo shutdown() so a shared fake can keep serving."""
        self._dead = False

    # ------------------------------------------------------------------- "model"
    def _token_stream(self, params: SamplingParams) -> list[int]:
        if params.temperature > 0 and params.seed is not None:
            words = SCRIPT.split(" ")
            random.Random(params.seed).shuffle(words)
            return self.tokenizer.encode(" ".join(words))
        return self.tokenizer.encode(SCRIPT)

    async def _run(self, prompt: list[int], params: SamplingParams, rid: str) -> AsyncIterator[RequestOutput]:
        eos = self.tokenizer.eos_token_id
        script = self._token_stream(params)
        emitted_text = ""  # text already yielded
        pending = ""  # text held back: it might be the start of a stop string
        prompt_lps = None
        if params.prompt_logprobs is not None:
            prompt_lps = [None] + [_fake_logprob(i, t, params.prompt_logprobs) for i, t in
                                   enumerate(prompt[1:], start=1)]
        n = 0
        while True:
            await asyncio.sleep(self.token_delay_s)
            if rid in self._abort_requested:
                yield RequestOutput(rid, prompt, finished=True, finish_reason="abort", num_generated_tokens=n)
                return
            tok = script[n % len(script)] if (n < len(script) or params.ignore_eos) else eos
            if tok == eos and n < params.min_tokens:
                tok = script[n % len(script)]
            n += 1
            self._gen_total += 1
            self._running[rid] += 1
            finish = None
            text = "" if tok == eos else self.tokenizer.decode([tok])
            pending += text
            if tok == eos or tok in params.stop_token_ids:
                finish = "stop"
            for s in params.stop:
                idx = pending.find(s)
                if idx >= 0:
                    pending = pending[: idx + (len(s) if params.include_stop_str_in_output else 0)]
                    finish = "stop"
                    break
            if finish is None and n >= params.max_tokens:
                finish = "length"
            held = 0 if finish else max((k for s in params.stop for k in range(1, len(s))
                                         if pending.endswith(s[:k])), default=0)
            out_text, pending = pending[: len(pending) - held], pending[len(pending) - held:]
            emitted_text += out_text
            lps = [_fake_logprob(len(prompt) + n - 1, tok, params.logprobs)] if params.logprobs is not None else None
            yield RequestOutput(rid, prompt, new_token_ids=[tok], new_text=out_text, new_logprobs=lps,
                                prompt_logprobs=prompt_lps if n == 1 else None, finished=finish is not None,
                                finish_reason=finish, num_generated_tokens=n)
            if finish:
                return
