"""The KV-cache interface the model talks to, and the per-step attention metadata.

The engine stores K/V in a pool of fixed-size blocks. A token's *slot* is
`block_id * block_size + offset`. The scheduler/block manager decide which slots a
sequence owns; the cache implementation decides how a slot is stored (fp tensors, or
quantized codes with explicit scale tensors) and how attention reads it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass
class PrefillSegment:
    """A sequence contributing q_len > 1 tokens this step (a prompt chunk)."""

    q_start: int  # row of its first new token in the flat batch
    q_len: int
    ctx_slots: torch.Tensor  # [ctx_len] long: slots of every token it attends to (cached + new)

    @property
    def ctx_len(self) -> int:
        return self.ctx_slots.shape[0]


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what each attends to.

    NOTE: rows [0, num_decodes) of the flat batch are single-token queries (decodes, or
    a one-token prefill chunk); prefill segments follow. Both groups attend causally
    over their own sequence's context only.
    """

    slot_mapping: torch.Tensor  # [T] long: slot where each new token's K/V is written
    num_decodes: int = 0
    decode_slots: torch.Tensor | None = None  # [B, max_ctx] long, padded with slot 0
    decode_mask: torch.Tensor | None = None  # [B, max_ctx] bool, True = attend
    decode_ctx_lens: torch.Tensor | None = None  # [B] long
    prefills: list[PrefillSegment] = field(default_factory=list)


class KVCache(ABC):
    """A paged KV pool for all layers. Implementations: fp (this file's sibling fp.py)."""

    num_blocks: int
    block_size: int

    @staticmethod
    @abstractmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int) -> float:
        """Real bytes one token occupies across all layers (admission uses this)."""

    @abstractmethod
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """Store this step's new k, v: [T, kv_heads, D] at meta.slot_mapping."""

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, heads, D] -> attention output [T, heads, D] over each row's context."""
