"""Full-precision paged KV cache (fp32 / bf16 / fp16). Attention gathers each sequence's
K/V and runs torch ops (attention.py), except decodes over an fp32 pool on CPU, which a
native kernel reads in place through the block table (kv_cache/native.py)."""

from __future__ import annotations

import torch

from bastion.engine.attention import batched_prefill_attention, decode_attention, plan_prefill_batch, prefill_attention
from bastion.engine.kv_cache.base import AttentionMetadata, KVCache
from bastion.engine.kv_cache.native import load_fp_kernel

_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


class FPKVCache(KVCache):
    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int, dtype: torch.dtype, device: torch.device, kernel: str = "auto"):
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        slots = num_blocks * block_size
        # k, v: [layers, slots, kv_heads, D]; a slot is block_id * block_size + offset
        self.k = torch.zeros(num_layers, slots, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.scale = head_dim ** -0.5
        self.token_bytes = self.bytes_per_token(num_layers, num_kv_heads, head_dim, dtype)
        native = dtype == torch.float32 and device.type == "cpu"
        self._native = load_fp_kernel(kernel) if native else None

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> float:
        """K and V of one token across all layers."""
        return 2 * num_layers * num_kv_heads * head_dim * _BYTES[dtype]

    def begin_step(self, meta: AttentionMetadata) -> None:
        if meta.prefills:  # small prompt chunks: padded batches, planned once for every layer
            meta.prefill_plan = plan_prefill_batch(meta.prefills)
        # the native kernel's view of the decode rows: block table [B, nblk] and lengths [B]
        if self._native is None or not meta.num_decodes:
            return
        spans = meta.spans[: meta.num_decodes]
        lens = [s.num_cached + 1 for s in spans]
        nblk = -(-max(lens) // self.block_size)
        rows = [s.block_ids[:nblk] for s in spans]
        table = torch.tensor([r + [0] * (nblk - len(r)) for r in rows], dtype=torch.long)  # pad: never read
        meta.plan = (table, torch.tensor(lens, dtype=torch.long))

    def decode_pools(self, meta: AttentionMetadata):
        if meta.plan is None or meta.prefills:
            return None
        table, lens = meta.plan
        return self.k, self.v, table, lens, self.block_size, self.scale

    def _decode(self, layer, q, meta: AttentionMetadata) -> torch.Tensor:
        if meta.plan is not None:
            table, lens = meta.plan
            return self._native.fp_decode_attention(q.contiguous(), self.k[layer], self.v[layer], table, lens,
                                                    self.block_size, self.scale)
        kc, vc = self.k[layer], self.v[layer]  # [slots, kv_heads, D]
        return decode_attention(q, kc[meta.decode_slots], vc[meta.decode_slots], meta.decode_mask, self.scale)

    def write(self, layer, k, v, meta: AttentionMetadata) -> None:
        self.k[layer].index_copy_(0, meta.slot_mapping, k.to(self.dtype))
        self.v[layer].index_copy_(0, meta.slot_mapping, v.to(self.dtype))

    def attend(self, layer, q, meta: AttentionMetadata) -> torch.Tensor:
        kc, vc = self.k[layer], self.v[layer]  # [slots, kv_heads, D]
        b = meta.num_decodes
        if not meta.prefills:
            return self._decode(layer, q, meta)
        out = torch.empty_like(q)
        if b:
            out[:b] = self._decode(layer, q[:b], meta)
        batches, segments = meta.prefill_plan or ((), meta.prefills)
        for batch in batches:
            out[batch.dest] = batched_prefill_attention(q, kc, vc, batch, self.scale)
        for seg in segments:
            rows = slice(seg.q_start, seg.q_start + seg.q_len)
            out[rows] = prefill_attention(q[rows], kc[seg.ctx_slots], vc[seg.ctx_slots], self.scale)
        return out
