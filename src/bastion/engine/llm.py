"""Offline batch API: `LLM(config).generate(prompts, params)` (like vLLM's LLM class)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from bastion.config import Config
from bastion.engine.detokenizer import IncrementalDetokenizer
from bastion.engine.llm_engine import LLMEngine
from bastion.engine.outputs import RequestOutput
from bastion.engine.sampling_params import SamplingParams, TokenLogprob


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None


class OutputProcessor:
    """Turns the engine's token deltas into text deltas, and ends requests whose output
    hit a stop string (aborting them in the engine frees their KV blocks)."""

    def __init__(self, engine: LLMEngine, tokenizer):
        self.engine, self.tokenizer = engine, tokenizer
        self.detok: dict[str, IncrementalDetokenizer] = {}

    def register(self, request_id: str, params: SamplingParams) -> None:
        self.detok[request_id] = IncrementalDetokenizer(self.tokenizer, params.stop, params.include_stop_str_in_output)

    def process(self, out: RequestOutput) -> RequestOutput:
        d = self.detok.get(out.request_id)
        if d is None:
            return out
        out.new_text, hit_stop = d.add(out.new_token_ids, out.finished)
        if hit_stop:  # also when the same token hit max_tokens: vLLM reports "stop"
            if not out.finished:
                self.engine.abort_request(out.request_id)
            out.finished, out.finish_reason = True, "stop"
        if out.finished:
            del self.detok[out.request_id]
        return out

    def drop(self, request_id: str) -> None:
        self.detok.pop(request_id, None)


class LLM:
    def __init__(self, config: Config | None = None, show_progress: bool = True):
        self.config = config or Config()
        self.engine, self.tokenizer, self.model_name = LLMEngine.from_config(self.config, show_progress)
        self.processor = OutputProcessor(self.engine, self.tokenizer)
        self._ids = itertools.count()

    def generate(self, prompts: list[list[int]] | list[str], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        plist = params if isinstance(params, list) else [params] * len(prompts)
        results: dict[str, Completion] = {}
        order = []
        for prompt, p in zip(prompts, plist):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = f"offline-{next(self._ids)}"
            self.engine.add_request(rid, ids, p)
            self.processor.register(rid, p)
            results[rid] = Completion(rid, ids)
            order.append(rid)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                out = self.processor.process(out)
                c = results[out.request_id]
                c.token_ids += out.new_token_ids
                c.text += out.new_text
                c.logprobs += out.new_logprobs or []
                if out.prompt_logprobs is not None:
                    c.prompt_logprobs = out.prompt_logprobs
                if out.finished:
                    c.finish_reason = out.finish_reason
        return [results[r] for r in order]
