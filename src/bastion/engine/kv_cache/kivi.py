"""KIVI-quantized paged KV cache (arXiv 2402.02750) behind the engine's KV interface.

Storage, per layer (H = kv heads, D = head dim, G = group size = block size):
  quantized pool, one block = one G-token group (layouts of quant.py):
    k_codes [N, G, H, D*kb/8] uint8   k_scale, k_zero [N, H, D] fp16      (per channel)
    v_codes [N, G, H, D*vb/8] uint8   v_scale, v_zero [N, G, H, D/Gv] fp16 (per token; Gv
                                      channels per value group, G unless set apart)
  (a sequence owns blocks only for groups that have left the window: block_ids[i] holds
  positions S + i*G .. S + i*G + G - 1; see blocks_for)
  full-precision region, one per sequence slot (the block manager hands slots out):
    k_fp, v_fp [slots * (S + W), H, D]: S sink tokens, then a ring of W = R + G tokens.

Life of a token at position p of a sequence holding ctx tokens: it is written to the ring
(slot S + p % W) in full precision. The sequence's quantized frontier is
nq(ctx) = split_context(ctx)[0] (a multiple of G leaving R..R+G-1 tokens in the window);
when a step moves the frontier, each G-group that crossed it is quantized ONCE into the
sequence's own block for that group (groups below S are copied to the sink area instead,
and stay fp). Nothing is ever re-quantized. Decode steps quantize their groups for all
layers at once at the last layer's write (one call per step, not per layer); prompt
chunks per layer, from their tail scratch. Attention of a step reads:
  quantized blocks [S/G, nq0/G)  +  sink fp [0, min(S, nq0))  +  fp tail [nq0, ctx1)
where nq0 is the frontier before the step, so this step's own tokens (a decode, or a
whole prompt chunk) are seen in full precision, as in KIVI's prefill.

NOTE: the ring never aliases: before a decode ctx0 - nq0 <= R + G - 1, so the new token's
ring slot is free. A prompt chunk can be longer than W, so its tail is built in a scratch
tensor (old window + new tokens) instead of going through the ring.

Hadamard option: K and V are rotated by an orthonormal Hadamard H before storing (all of
them, fp and quantized), q is rotated at attention and the output rotated back: q.k and
p @ v are unchanged, outlier channels are spread before quantizing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bastion.engine.kv_cache.base import AttentionMetadata, KVCache
from bastion.engine.kv_cache.native import load_kernel
from bastion.engine.kv_cache.quant import (
    KVQuantSpec, QuantKeys, QuantValues, bytes_per_token, hadamard, quantize_keys, quantize_values, split_context,
)
from bastion.engine.kv_cache.quant_attention import quantized_decode_attention, quantized_prefill_attention

_FP_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass
class _Jobs:
    """Groups leaving the window this step: quantize src rows into blocks, copy sink rows."""

    q_src: list[int]  # region rows (or tail rows) of quantized groups, G per group
    q_dst: list[int]  # destination block per group
    sink_src: list[int]
    sink_dst: list[int]


@dataclass
class _Prefill:
    rows: slice  # query rows of this chunk
    old_idx: torch.Tensor  # [ctx0 - nq0] region rows of the old window
    sink_idx: torch.Tensor  # [min(S, nq0)] region rows of the sink
    table: torch.Tensor | None  # [n] quantized blocks attended (None: none)
    q_src: torch.Tensor  # [J*G] tail rows to quantize
    q_dst: torch.Tensor  # [J] blocks
    sink_src: torch.Tensor  # tail rows copied to the sink
    sink_dst: torch.Tensor  # region rows
    ring_src: torch.Tensor  # tail rows written to the ring
    ring_dst: torch.Tensor  # region rows


@dataclass
class _Plan:
    num_decodes: int
    dec_new: torch.Tensor | None = None  # [B] region rows of the decodes' new tokens
    dec_fp_idx: torch.Tensor | None = None  # [B, L] region rows of sink + window (padded)
    dec_fp_mask: torch.Tensor | None = None  # [B, L]
    dec_table: torch.Tensor | None = None  # [B, n] quantized blocks (padded with 0), None if n == 0
    dec_block_mask: torch.Tensor | None = None  # [B, n]
    dec_q_src: torch.Tensor | None = None  # [J*G] region rows to quantize
    dec_q_dst: torch.Tensor | None = None  # [J]
    dec_sink_src: torch.Tensor | None = None
    dec_sink_dst: torch.Tensor | None = None
    prefills: list[_Prefill] | None = None


def _long(x, device) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.long, device=device)


class KIVIKVCache(KVCache):
    uses_slots = False  # plans its own indices from meta.spans in begin_step
    # NOTE: a sequence's newest tokens live in its own fp window, which a prefix-cache hit
    # could not bring along: a block is not all of its KV, so no prefix caching.
    supports_prefix_cache = False

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, spec: KVQuantSpec,
                 num_seq_slots: int, sink: int = 0, use_hadamard: bool = False,
                 fp_dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                 kernel: str = "torch"):
        spec.check_head_dim(head_dim)
        g = spec.group_size
        if sink < 0 or sink % g:
            raise ValueError(f"sink={sink} must be a non-negative multiple of the group size {g}")
        if head_dim * min(spec.k_bits, spec.v_bits) % 8:
            raise ValueError(f"head_dim={head_dim} cannot be packed at K{spec.k_bits}V{spec.v_bits}")
        self.spec, self.sink, self.num_blocks, self.block_size = spec, sink, num_blocks, g
        self.num_seq_slots, self.device = num_seq_slots, torch.device(device)
        self.ring = spec.residual + g  # W
        self.region = sink + self.ring
        self.scale = head_dim ** -0.5
        h, d, n, L = num_kv_heads, head_dim, num_blocks, num_layers
        u8, f16 = dict(dtype=torch.uint8, device=device), dict(dtype=torch.float16, device=device)
        self.k_codes = torch.zeros(L, n, g, h, d * spec.k_bits // 8, **u8)
        self.k_scale, self.k_zero = torch.zeros(L, n, h, d, **f16), torch.zeros(L, n, h, d, **f16)
        self.v_codes = torch.zeros(L, n, g, h, d * spec.v_bits // 8, **u8)
        nv = d // spec.value_group
        self.v_scale, self.v_zero = torch.zeros(L, n, g, h, nv, **f16), torch.zeros(L, n, g, h, nv, **f16)
        self.k_fp = torch.zeros(L, num_seq_slots * self.region, h, d, dtype=fp_dtype, device=device)
        self.v_fp = torch.zeros_like(self.k_fp)
        self.rot = hadamard(d, device=device) if use_hadamard else None
        self.token_bytes = bytes_per_token(spec, L, h, d)
        self.fp_token_bytes = 2 * L * h * d * _FP_BYTES[fp_dtype]
        self.reserved_bytes = int(num_seq_slots * self.region * self.fp_token_bytes)
        # built here, not at the first step, so a server never compiles mid-request
        self.kernel = load_kernel(kernel, head_dim) if self.device.type == "cpu" else None

    @staticmethod
    def reserved_for(spec: KVQuantSpec, sink: int, num_seq_slots: int, fp_token_bytes: float) -> float:
        return num_seq_slots * (sink + spec.residual + spec.group_size) * fp_token_bytes

    def quantized_tokens(self, ctx_len: int) -> int:
        """The frontier: tokens [0, nq) have left the window (quantized, or sink)."""
        return split_context(self.spec, ctx_len)[0]

    def blocks_for(self, num_tokens: int) -> int:
        """Quantized blocks a sequence of num_tokens holds: one per group that has left the
        window, sink groups excepted (block_ids[i] holds positions S + i*G ..)."""
        return max(0, self.quantized_tokens(num_tokens) - self.sink) // self.block_size

    # ------------------------------------------------------------------ per-step plan
    def _ring_row(self, slot: int, p: int) -> int:
        return slot * self.region + self.sink + p % self.ring

    def _fp_rows(self, slot: int, nq0: int, ctx1: int) -> list[int]:
        """Region rows of sink [0, min(S, nq0)) then window [nq0, ctx1)."""
        base = slot * self.region
        return [base + p for p in range(min(self.sink, nq0))] + [self._ring_row(slot, p) for p in range(nq0, ctx1)]

    def _jobs(self, span, nq0: int, nq1: int, src_row) -> _Jobs:
        g, jobs = self.block_size, _Jobs([], [], [], [])
        for p0 in range(nq0, nq1, g):
            src = [src_row(p) for p in range(p0, p0 + g)]
            if p0 < self.sink:
                jobs.sink_src += src
                jobs.sink_dst += [span.seq_slot * self.region + p for p in range(p0, p0 + g)]
            else:
                jobs.q_src += src
                jobs.q_dst.append(span.block_ids[(p0 - self.sink) // g])
        return jobs

    def begin_step(self, meta: AttentionMetadata) -> None:
        dev = self.device
        plan = _Plan(meta.num_decodes, prefills=[])
        decs = meta.spans[: meta.num_decodes]
        if decs:
            fp_rows, tables, jobs = [], [], _Jobs([], [], [], [])
            for sp in decs:
                if sp.seq_slot < 0:
                    raise RuntimeError("KIVI cache needs a sequence slot per request (block manager num_seq_slots)")
                ctx0, ctx1 = sp.num_cached, sp.num_cached + sp.num_new
                nq0, nq1 = self.quantized_tokens(ctx0), self.quantized_tokens(ctx1)
                fp_rows.append(self._fp_rows(sp.seq_slot, nq0, ctx1))
                tables.append(sp.block_ids[: self.blocks_for(ctx0)])
                j = self._jobs(sp, nq0, nq1, lambda p, s=sp.seq_slot: self._ring_row(s, p))
                for a in ("q_src", "q_dst", "sink_src", "sink_dst"):
                    getattr(jobs, a).extend(getattr(j, a))
            b, lmax, nmax = len(decs), max(map(len, fp_rows)), max(map(len, tables))
            idx, mask = torch.zeros(b, lmax, dtype=torch.long), torch.zeros(b, lmax, dtype=torch.bool)
            for i, r in enumerate(fp_rows):
                idx[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
            plan.dec_new = _long([self._ring_row(sp.seq_slot, sp.num_cached) for sp in decs], dev)
            plan.dec_fp_idx, plan.dec_fp_mask = idx.to(dev), mask.to(dev)
            if nmax:
                tab, bm = torch.zeros(b, nmax, dtype=torch.long), torch.zeros(b, nmax, dtype=torch.bool)
                for i, t in enumerate(tables):
                    if t:
                        tab[i, : len(t)], bm[i, : len(t)] = torch.tensor(t), True
                plan.dec_table, plan.dec_block_mask = tab.to(dev), bm.to(dev)
            plan.dec_q_src, plan.dec_q_dst = _long(jobs.q_src, dev), _long(jobs.q_dst, dev)
            plan.dec_sink_src, plan.dec_sink_dst = _long(jobs.sink_src, dev), _long(jobs.sink_dst, dev)
        for sp in meta.spans[meta.num_decodes :]:
            ctx0, ctx1 = sp.num_cached, sp.num_cached + sp.num_new
            nq0, nq1 = self.quantized_tokens(ctx0), self.quantized_tokens(ctx1)
            # tail rows: 0 .. ctx1 - nq0 hold positions nq0 .. ctx1 (old window, then new)
            j = self._jobs(sp, nq0, nq1, lambda p, nq0=nq0: p - nq0)
            base = sp.seq_slot * self.region
            table = sp.block_ids[: self.blocks_for(ctx0)]
            plan.prefills.append(_Prefill(
                rows=slice(sp.q_start, sp.q_start + sp.num_new),
                old_idx=_long([self._ring_row(sp.seq_slot, p) for p in range(nq0, ctx0)], dev),
                sink_idx=_long([base + p for p in range(min(self.sink, nq0))], dev),
                table=_long(table, dev) if table else None,
                q_src=_long(j.q_src, dev), q_dst=_long(j.q_dst, dev),
                sink_src=_long(j.sink_src, dev), sink_dst=_long(j.sink_dst, dev),
                ring_src=_long(list(range(nq1 - nq0, ctx1 - nq0)), dev),
                ring_dst=_long([self._ring_row(sp.seq_slot, p) for p in range(nq1, ctx1)], dev),
            ))
        meta.plan = plan

    # ------------------------------------------------------------------ write
    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.rot is None else (x.float() @ self.rot).to(x.dtype)

    def _quantize_into(self, layer: int | None, k: torch.Tensor, v: torch.Tensor, dst: torch.Tensor) -> None:
        """k, v [L', J*G, H, D] (already rotated) -> blocks dst [J] of one layer's pool
        (L' = 1) or of every layer's (layer None, L' = L), in one quantize call."""
        if dst.numel() == 0:
            return
        nl, t = k.shape[:2]
        kq = quantize_keys(k.reshape(nl * t, *k.shape[2:]), self.spec)  # codes [L'*J, G, H, Dpk]
        vq = quantize_values(v.reshape(nl * t, *v.shape[2:]), self.spec)  # codes [L'*J*G, H, Dpv]
        n = self.num_blocks
        layers = torch.arange(nl, device=dst.device) if layer is None else torch.tensor([layer], device=dst.device)
        rows = (layers[:, None] * n + dst[None, :]).reshape(-1)  # [L'*J] blocks of the [L*N] flat pool
        j = dst.numel()
        for pool, x in ((self.k_codes, kq.codes), (self.k_scale, kq.scale), (self.k_zero, kq.zero),
                        (self.v_codes, vq.codes), (self.v_scale, vq.scale), (self.v_zero, vq.zero)):
            flat = pool.view(-1, *pool.shape[2:])  # [L*N, ...]: pools are contiguous
            flat.index_copy_(0, rows, x.reshape(nl * j, *pool.shape[2:]))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """k, v [T, H, D]: decodes go through the ring, prompt chunks through a tail scratch."""
        plan: _Plan = meta.plan
        k, v = self._rotate(k), self._rotate(v)
        kf, vf = self.k_fp[layer], self.v_fp[layer]  # [slots*(S+W), H, D]
        b = plan.num_decodes
        if b:
            kf.index_copy_(0, plan.dec_new, k[:b].to(kf.dtype))
            vf.index_copy_(0, plan.dec_new, v[:b].to(vf.dtype))
            if plan.dec_sink_src.numel():
                kf.index_copy_(0, plan.dec_sink_dst, kf[plan.dec_sink_src])
                vf.index_copy_(0, plan.dec_sink_dst, vf[plan.dec_sink_src])
            if layer == self.k_fp.shape[0] - 1:
                # NOTE: the groups leaving the decodes' windows are quantized for EVERY layer
                # here, at the last layer's write, in one call: per layer, a flush step cost
                # ~6 ms of small ops at 30 layers (a p99 spike). Valid because no attention of
                # this step reads these blocks (it reads the group from the fp window) and
                # every layer's rows, this step's token included, are written by now.
                src = plan.dec_q_src
                self._quantize_into(None, self.k_fp[:, src], self.v_fp[:, src], plan.dec_q_dst)
        self._tails = []
        for pf in plan.prefills:
            # NOTE: the window is read before anything of this chunk is written to the ring.
            tk = torch.cat([kf[pf.old_idx], k[pf.rows].to(kf.dtype)])  # [ctx1 - nq0, H, D]
            tv = torch.cat([vf[pf.old_idx], v[pf.rows].to(vf.dtype)])
            self._quantize_into(layer, tk[pf.q_src][None], tv[pf.q_src][None], pf.q_dst)
            if pf.sink_src.numel():
                kf.index_copy_(0, pf.sink_dst, tk[pf.sink_src])
                vf.index_copy_(0, pf.sink_dst, tv[pf.sink_src])
            kf.index_copy_(0, pf.ring_dst, tk[pf.ring_src])
            vf.index_copy_(0, pf.ring_dst, tv[pf.ring_src])
            self._tails.append((torch.cat([kf[pf.sink_idx], tk]), torch.cat([vf[pf.sink_idx], tv])))

    # ------------------------------------------------------------------ attend
    def _pool(self, layer: int) -> tuple[QuantKeys, QuantValues]:
        return (QuantKeys(self.k_codes[layer], self.k_scale[layer], self.k_zero[layer]),
                QuantValues(self.v_codes[layer], self.v_scale[layer], self.v_zero[layer]))

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        plan: _Plan = meta.plan
        q = self._rotate(q)
        kq, vq = self._pool(layer)
        out = torch.empty_like(q)
        b = plan.num_decodes
        if b:
            kf, vf = self.k_fp[layer], self.v_fp[layer]
            has_q = plan.dec_table is not None
            out[:b] = quantized_decode_attention(
                q[:b], kq if has_q else None, vq if has_q else None,
                kf[plan.dec_fp_idx], vf[plan.dec_fp_idx], self.spec,
                block_mask=plan.dec_block_mask, window_mask=plan.dec_fp_mask, block_table=plan.dec_table,
                scale=self.scale, kernel=self.kernel)
        for pf, (tk, tv) in zip(plan.prefills, self._tails):
            has_q = pf.table is not None
            out[pf.rows] = quantized_prefill_attention(
                q[pf.rows], kq if has_q else None, vq if has_q else None, tk, tv, self.spec,
                block_table=pf.table, scale=self.scale)
        return self._rotate(out)  # H is its own inverse
