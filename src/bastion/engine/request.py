"""A request as the engine tracks it: token ids and how many of them have KV computed."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from bastion.engine.sampling_params import SamplingParams, TokenLogprob


class TokenFilter(Protocol):
    def __call__(self, token: int, logits: torch.Tensor, ref_logits: torch.Tensor, req: "Request") -> int:
        """logits / ref_logits [V] fp32 (with / without the adapter) -> the token to emit."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_id: int | None = None
    arrival: float = field(default_factory=time.monotonic)
    # NOTE: token_ids = prompt + outputs. The scheduler only ever compares
    # num_computed_tokens with len(token_ids); prefill and decode are not phases.
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens that came from the prefix cache
    block_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_preemptions: int = 0
    # NOTE: set when a step this request was part of raised: it is rolled back (recompute)
    # and scheduled in batches of its own until it samples a token, so the step that
    # fails again names the culprit (LLMEngine._contain).
    isolated: bool = False
    cache_salt: str = ""  # separates prefix-cache namespaces (e.g. per adapter)
    lora_slot: int = 0  # 0 = base model; else the adapter registry's slot
    block_hashes: list[bytes] = field(default_factory=list)  # chain hashes of full blocks
    seq_slot: int = -1  # per-sequence cache state slot (KIVI fp window), held while it owns blocks
    # A token filter (e.g. guard.cleangen.CleanGen) sees every sampled token together with
    # the base model's logits for the same position: the engine then runs a reference
    # track (same tokens, no adapter, its own KV blocks) in the same batch.
    token_filter: "TokenFilter | None" = None
    ref_block_ids: list[int] = field(default_factory=list)
    ref_cache_salt: str = ""  # the reference track's prefix-cache namespace (the base model's)
    ref_block_hashes: list[bytes] = field(default_factory=list)
    num_replaced_tokens: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        # only while the prompt itself is being computed for the first time
        return self.params.prompt_logprobs is not None and self.num_computed_tokens < self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


class ReferenceView:
    """A request's reference track as the model runner sees it: the same tokens and
    progress, the base model (lora slot 0), its own block table."""

    def __init__(self, req: Request):
        self.req = req

    request_id = property(lambda self: self.req.request_id)
    token_ids = property(lambda self: self.req.token_ids)
    num_computed_tokens = property(lambda self: self.req.num_computed_tokens)
    num_tokens = property(lambda self: self.req.num_tokens)
    num_prompt_tokens = property(lambda self: self.req.num_prompt_tokens)
    block_ids = property(lambda self: self.req.ref_block_ids)
    lora_slot = 0
    seq_slot = -1
    wants_prompt_logprobs = False
