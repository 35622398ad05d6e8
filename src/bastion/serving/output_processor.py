"""Token deltas -> text deltas: one incremental detokenizer per request, and the end of
a request whose text hit a stop string (aborting it in the engine frees its KV blocks)."""

from __future__ import annotations

from bastion.engine.llm_engine import LLMEngine
from bastion.engine.outputs import RequestOutput
from bastion.engine.sampling_params import SamplingParams
from bastion.serving.detokenizer import IncrementalDetokenizer


class OutputProcessor:
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
