"""A request as the engine tracks it: token ids, how many of them have KV computed, and
the tracks that compute it.

A track is one sequence of KV over the request's tokens, with its own weights (adapter
slot), prefix-cache namespace (salt), block table and per-sequence cache slot. Track 0
is what gets sampled. A token filter may ask for more tracks over the same tokens with
other weights (e.g. a reference model), run in the same batch; it then sees their logits
beside track 0's at every sampled position and decides the token to emit.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from bastion.engine.sampling_params import SamplingParams, TokenLogprob


class TokenFilter(Protocol):
    # the extra tracks it needs, an adapter name each (None: the base model, no adapter)
    tracks: tuple[str | None, ...]

    def __call__(self, token: int, logits: torch.Tensor, track_logits: torch.Tensor, req: "Request") -> int:
        """logits [V] fp32 of track 0, track_logits [K, V] of the extra tracks at the same
        position (masked alike) -> the token to emit."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class Scheduling:
    """How the scheduler ranks a request (engine/scheduler_policy.py): `priority` (lower
    first, under the priority policy) and the `tenant` it is served for, with the tenant's
    `weight` (its share under the fair policy). The engine gives these no other meaning."""

    priority: int = 0
    tenant: str = ""
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"tenant weight must be > 0, got {self.weight!r}")


@dataclass
class Track:
    adapter_slot: int = 0  # 0 = the base model; else the adapter registry's slot
    cache_salt: str = ""  # prefix-cache namespace (tenant, adapter load)
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chain hashes of its full blocks (memoised)
    seq_slot: int = -1  # per-sequence cache state slot (KIVI fp window), held while it owns blocks


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_id: int | None = None
    tracks: list[Track] = field(default_factory=lambda: [Track()])
    token_filter: TokenFilter | None = None
    scheduling: Scheduling = field(default_factory=Scheduling)
    arrival: float = field(default_factory=time.monotonic)
    # NOTE: token_ids = prompt + outputs. The scheduler only ever compares
    # num_computed_tokens with len(token_ids); prefill and decode are not phases. Every
    # track has the same num_computed_tokens.
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens that came from the prefix cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_preemptions: int = 0
    # NOTE: set when a step this request was part of raised: it is rolled back (recompute)
    # and scheduled in batches of its own until it samples a token, so the step that
    # fails again names the culprit (LLMEngine._contain).
    isolated: bool = False
    num_replaced_tokens: int = 0  # tokens the token filter changed
    num_charged_tokens: int = 0  # service counted by the fair policy (high-water mark, not recompute)

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
