"""What the engine hands back per request and step, and the errors callers map to HTTP codes."""

from __future__ import annotations

from dataclasses import dataclass, field

from bastion.engine.sampling_params import TokenLogprob


@dataclass
class RequestOutput:
    """One delta for one request. Streaming callers forward each delta; non-streaming
    callers concatenate them. `prompt_logprobs` is only set on a request's first output."""

    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""  # detokenized delta; stop strings already trimmed
    new_logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # entry 0 is None (no context)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None  # why the engine failed this request (finish_reason "error")
    num_generated_tokens: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    num_replaced_tokens: int | None = None  # tokens CleanGen replaced so far (None: not defended)


@dataclass
class EngineStats:
    num_waiting: int
    num_running: int
    kv_blocks_total: int
    kv_blocks_used: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    weight_bytes: int = 0  # the model's weights as held in memory (quantized codes + scales)
    # expert offload (engine/models/moe_offload.py; all 0 without --moe-memory): expert
    # activations, those found resident, bytes read from the model file, tokens through the MoE
    moe_expert_lookups: int = 0
    moe_expert_hits: int = 0
    moe_bytes_read: int = 0
    moe_tokens: int = 0


class EngineError(Exception):
    """Base class of errors a caller should report to its user (not crash on)."""


class QueueFullError(EngineError):
    """The waiting queue is at its bound; retry later (HTTP 429)."""


class PromptTooLongError(EngineError):
    """prompt + max_tokens cannot fit the model context or the KV pool (HTTP 413)."""


class EngineDeadError(EngineError):
    """The engine loop stopped (shutdown or a fatal error); no new requests."""


class RequestFailedError(EngineError):
    """A step failed on this request; the engine failed it alone and serves the others."""
