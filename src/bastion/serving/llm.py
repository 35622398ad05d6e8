"""Offline batch API: `LLM(config).generate(prompts, params)` (like vLLM's LLM class)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from bastion.config import Config
from bastion.engine.sampling_params import SamplingParams, TokenLogprob
from bastion.serving.output_processor import OutputProcessor
from bastion.serving.tokenizer import load_engine


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None


class LLM:
    def __init__(self, config: Config | None = None, show_progress: bool = True):
        self.config = config or Config()
        self.engine, self.tokenizer, self.model_name = load_engine(self.config, show_progress)
        self.processor = OutputProcessor(self.engine, self.tokenizer)
        self._ids = itertools.count()

    def generate(self, prompts: list[list[int]] | list[str], params: SamplingParams | list[SamplingParams],
                 adapter: str | None = None) -> list[Completion]:
        """Every prompt to completion, on `adapter` (loaded in self.engine; None: the base)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        results: dict[str, Completion] = {}
        order = []
        for prompt, p in zip(prompts, plist):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = f"offline-{next(self._ids)}"
            self.engine.add_request(rid, ids, p, adapter=adapter)
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
