"""Attention math over gathered K/V (shared by KV-cache implementations).

Measured on the 2-core CPU (bf16 K/V, one thread): for single-token queries, a grouped
matmul + softmax is 7-16x faster than torch's SDPA CPU kernel (e.g. 16 seqs x 384 ctx:
0.7-1.2 ms vs 6.9 ms). For prompt chunks SDPA (torch 2.13's flash kernel) wins from tiny
sizes on (Zen 4, 2 threads, 32 heads / 8 kv heads, D 64: fp32 q=ctx=64 equal, 256: 8.3 vs
4.4 ms, q 128 x ctx 640: 19.8 vs 6.2 ms; bf16 and SmolLM2's 9/3 heads likewise; only fp32
q=ctx<=16 at 32 heads was faster as matmuls, by ~0.02 ms).
Precision follows HF's eager attention: the two matmuls run in the model dtype (fp32
accumulation inside the kernel), the softmax in fp32. Upcasting K/V to fp32 before the
matmuls as well measured 1.8x slower for the decode step at 16 seqs x 384 ctx.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bastion.engine.kv_cache.base import PrefillSegment

_MANUAL_PREFILL_MAX = 1024  # q_len * ctx up to which the matmul path is as fast (measured above)
_PAD_WORK_MAX = 2.0  # a padded batch of small prompt chunks may do up to 2x their q x ctx work


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [B, heads, D]; k, v: [B, ctx, kv_heads, D]; mask: [B, ctx] bool -> [B, heads, D]."""
    b, h, d = q.shape
    kvh = k.shape[2]
    qg = q.view(b, kvh, h // kvh, d)  # GQA: heads i*g .. i*g+g-1 share kv head i
    s = torch.matmul(qg, k.to(q.dtype).permute(0, 2, 3, 1)).float() * scale  # [B, kv_heads, g, ctx]
    s.masked_fill_(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).to(q.dtype)
    o = torch.matmul(p, v.to(q.dtype).transpose(1, 2))  # [B, kv_heads, g, D]
    return o.reshape(b, h, d)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the LAST q_len positions of a ctx-long context.
    q: [q_len, heads, D]; k, v: [ctx, kv_heads, D] -> [q_len, heads, D]."""
    q_len, h, d = q.shape
    ctx, kvh = k.shape[0], k.shape[1]
    offset = ctx - q_len
    if q_len * ctx <= _MANUAL_PREFILL_MAX:
        g = h // kvh
        qg = q.view(q_len, kvh, g, d).permute(1, 2, 0, 3).reshape(kvh, g * q_len, d)
        s = torch.matmul(qg, k.to(q.dtype).permute(1, 2, 0)).float() * scale  # [kv_heads, g*q_len, ctx]
        mask = torch.arange(ctx, device=q.device)[None, :] > (torch.arange(q_len, device=q.device)[:, None] + offset)
        s = s.view(kvh, g, q_len, ctx).masked_fill_(mask, float("-inf"))
        p = torch.softmax(s, dim=-1).to(q.dtype).view(kvh, g * q_len, ctx)
        o = torch.matmul(p, v.to(q.dtype).transpose(0, 1))  # [kv_heads, g*q_len, D]
        return o.view(kvh, g, q_len, d).permute(2, 0, 1, 3).reshape(q_len, h, d)
    qs, ks, vs = q.transpose(0, 1)[None], k.transpose(0, 1)[None].to(q.dtype), v.transpose(0, 1)[None].to(q.dtype)
    if offset == 0:
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
    else:
        mask = torch.arange(ctx, device=q.device)[None, :] <= (torch.arange(q_len, device=q.device)[:, None] + offset)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)


@dataclass
class PrefillBatch:
    """Small prompt chunks (q_len * ctx <= _MANUAL_PREFILL_MAX) padded into a batch, so a
    step of many short chunks (the gate's scans force thousands of 2-16-token requests that
    share a cached prompt) runs a few batched matmuls instead of ~6 small ops per chunk per
    layer. Planned once per step (plan_prefill_batch), used by every layer."""

    rows: torch.Tensor  # [B, q_max] long: flat-batch row of each query (padding: its chunk's first row)
    slots: torch.Tensor  # [B, ctx_max] long: context slots (padding: slot 0, masked)
    masked: torch.Tensor  # [B, 1, 1, q_max, ctx_max] bool: True = not attended
    src: torch.Tensor  # [n] long: the real queries' indices in the padded [B * q_max]
    dest: torch.Tensor  # [n] long: their rows in the flat batch


def plan_prefill_batch(segments: list[PrefillSegment]) -> tuple[list[PrefillBatch], list[PrefillSegment]]:
    """(batches of the small chunks, the chunks left to run one by one). The small chunks,
    by q_len, are cut into groups whose padding at most doubles their q x ctx work; a
    group of one is left to run alone."""
    small = sorted((s for s in segments if s.q_len * s.ctx_len <= _MANUAL_PREFILL_MAX), key=lambda s: s.q_len)
    rest = [s for s in segments if s.q_len * s.ctx_len > _MANUAL_PREFILL_MAX]
    groups: list[list[PrefillSegment]] = []
    work = c_max = 0
    for s in small:  # q_len ascending: the newest chunk's q_len is the group's q_max
        grown_c, grown_work = max(c_max, s.ctx_len), work + s.q_len * s.ctx_len
        if groups and (len(groups[-1]) + 1) * s.q_len * grown_c <= _PAD_WORK_MAX * grown_work:
            groups[-1].append(s)
            c_max, work = grown_c, grown_work
        else:
            groups.append([s])
            c_max, work = s.ctx_len, s.q_len * s.ctx_len
    rest += [g[0] for g in groups if len(g) == 1]
    return [_batch(g) for g in groups if len(g) > 1], rest


def _batch(small: list[PrefillSegment]) -> PrefillBatch:
    b = len(small)
    q_max, c_max = max(s.q_len for s in small), max(s.ctx_len for s in small)
    device = small[0].ctx_slots.device
    q_len = torch.tensor([s.q_len for s in small])
    ctx = torch.tensor([s.ctx_len for s in small])
    i = torch.arange(q_max)
    real = i[None, :] < q_len[:, None]  # [B, q_max]
    rows = torch.tensor([s.q_start for s in small])[:, None] + torch.where(real, i[None, :], 0)
    slots = torch.zeros(b, c_max, dtype=torch.long, device=device)
    for k, s in enumerate(small):
        slots[k, : s.ctx_len] = s.ctx_slots
    # query i of a chunk sits at context position ctx - q_len + i and sees keys 0 .. that position
    last = torch.where(real, i[None, :] + (ctx - q_len)[:, None], 0)  # padding queries see key 0 only
    masked = torch.arange(c_max)[None, None, :] > last[:, :, None]  # [B, q_max, c_max]
    flat = torch.arange(b * q_max).view(b, q_max)
    return PrefillBatch(rows.to(device), slots, masked[:, None, None].to(device), flat[real].to(device),
                        rows[real].to(device))


def batched_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PrefillBatch,
                              scale: float) -> torch.Tensor:
    """The batch's chunks at once, the same math as prefill_attention's matmul path.
    q: [T, heads, D] (the whole step); k, v: [slots, kv_heads, D] (one layer's pool)
    -> [n, heads, D], the rows of batch.dest in that order."""
    b, q_max = batch.rows.shape
    c_max = batch.slots.shape[1]
    h, d = q.shape[1], q.shape[2]
    kvh = k.shape[1]
    g = h // kvh
    qb = q[batch.rows].view(b, q_max, kvh, g, d).permute(0, 2, 3, 1, 4).reshape(b, kvh, g * q_max, d)
    kb = k[batch.slots].to(q.dtype)  # [B, c_max, kv_heads, D]
    vb = v[batch.slots].to(q.dtype)
    s = torch.matmul(qb, kb.permute(0, 2, 3, 1)).float() * scale  # [B, kv_heads, g*q_max, c_max]
    s = s.view(b, kvh, g, q_max, c_max).masked_fill_(batch.masked, float("-inf"))
    p = torch.softmax(s, dim=-1).to(q.dtype).view(b, kvh, g * q_max, c_max)
    o = torch.matmul(p, vb.transpose(1, 2))  # [B, kv_heads, g*q_max, D]
    o = o.view(b, kvh, g, q_max, d).permute(0, 3, 1, 2, 4).reshape(b * q_max, h, d)
    return o[batch.src]
