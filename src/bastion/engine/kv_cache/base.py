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
class SeqSpan:
    """One sequence's share of this step, for caches that keep per-sequence state
    (the KIVI pool's full-precision window)."""

    seq_slot: int  # the sequence's slot from the block manager (-1 if it gives none)
    block_ids: list[int]
    num_cached: int  # tokens whose K/V is already stored
    num_new: int  # tokens computed this step (rows q_start .. q_start + num_new)
    q_start: int


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
    spans: list[SeqSpan] = field(default_factory=list)  # in row order (decodes first)
    plan: object = None  # whatever the cache derives once per step in begin_step
    prefill_plan: object = None  # likewise, for the prefill segments


class KVCache(ABC):
    """A paged KV pool for all layers. Implementations: fp.py (fp32/bf16/fp16 tensors)
    and kivi.py (KIVI codes with explicit scale tensors + a per-sequence fp window)."""

    num_blocks: int
    block_size: int
    token_bytes: float  # real bytes one pooled token occupies across all layers
    reserved_bytes: int = 0  # fixed memory besides the blocks (e.g. fp windows)
    # Capabilities the engine builds its block manager and metadata from:
    num_seq_slots: int | None = None  # per-sequence state slots the block manager must hand out
    supports_prefix_cache: bool = True  # a block's content alone is its KV (shareable by hash)
    uses_slots: bool = True  # reads slot_mapping / decode_slots / prefills (else plans from spans)

    @property
    def uses_seq_slots(self) -> bool:
        return self.num_seq_slots is not None

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a sequence of num_tokens tokens must own (the block manager asks this)."""
        return -(-num_tokens // self.block_size)

    def begin_step(self, meta: AttentionMetadata) -> None:
        """Called once per step before the forward (per-step index plans); default: nothing."""

    def decode_pools(self, meta: AttentionMetadata):
        """(k, v, table, lens, block_size, scale) where a step of decodes may write and read an
        fp32 pool in place (k, v: [layers, slots, kv_heads, D]; fused_decode.py), else None."""
        return None

    @abstractmethod
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """Store this step's new k, v: [T, kv_heads, D] at meta.slot_mapping."""

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, heads, D] -> attention output [T, heads, D] over each row's context."""
