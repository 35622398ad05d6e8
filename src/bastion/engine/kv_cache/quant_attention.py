"""Attention over a KIVI-quantized prefix plus a full-precision window, without ever
materialising a dequantized copy of the cache.

Context of one sequence = [quantized prefix: n blocks of G tokens] + [fp window: w tokens],
in that order. Only complete G-token groups are quantized, so one quantized block is one
key group (G tokens) and G tokens of values.

Keys (per channel, block j, channel d): k_td = s_jd c_td + m_jd, so
    q . k_t = sum_d (q_d s_jd) c_td + sum_d q_d m_jd
i.e. scale folded into the query (one [M, D] query per block), min as one dot per block.
Values (per token t, channel group e of Gv channels): v_td = s_te c_td + m_te, so
    sum_t p_t v_td = sum_t (p_t s_te) c_td + sum_t p_t m_te
i.e. scale folded into the attention weights, min as p @ m.
That is the path for M <= G query rows per kv head (decode: M = heads / kv_heads). With
many rows (prefill) the fold costs more than the tile (M*D vs G*D per block), so there the
unpacked tile is scaled in place before the matmul; neither path ever holds more than one
bounded tile in fp32. Codes are unpacked `chunk_blocks` blocks at a time; scores and
softmax are fp32 and the softmax is joint over prefix + window (scores [.., ctx] are the
only ctx-sized intermediate, as in the fp path).

Argument layouts (H = kv heads, D = head dim, Dpk = D*kb/8, Dpv = D*vb/8, ng = D/Gv, Gv =
the value channel group, spec.value_group):
  gathered (block_table None):       pool form (block_table [B, n] long):
  kq.codes  [B, n, G, H, Dpk] uint8  kq.codes  [N, G, H, Dpk]   (pool slots viewed as blocks)
  kq.scale  [B, n, H, D]      fp16   kq.scale  [N, H, D]
  vq.codes  [B, n, G, H, Dpv] uint8  vq.codes  [N, G, H, Dpv]
  vq.scale  [B, n, G, H, ng]  fp16   vq.scale  [N, G, H, ng]
  (.zero like .scale). In pool form blocks are gathered chunk by chunk.
  block_mask [B, n] bool (True = attend); k_fp, v_fp [B, w, H, D] any float; window_mask [B, w].
Padding blocks / window rows must hold finite numbers (e.g. point at block 0), as in the
fp path: a masked weight is exactly 0, but 0 * inf is NaN.
"""

from __future__ import annotations

from types import ModuleType

import torch

from bastion.engine.kv_cache.native import HEAD_DIMS, native_decode_attention
from bastion.engine.kv_cache.quant import KVQuantSpec, QuantKeys, QuantValues, unpack_float

_PREFILL_SCORES = 1 << 18  # max q rows * ctx of one prefill score chunk (per kv head row)
# Codes unpacked per tile (B * H * blocks * max(G, M) * D): <= 4 MiB of fp32 scratch
# whatever ctx is. Measured (1 thread, ctx 4096, H=3, D=64, G=32): B=1 one tile 1.0 ms vs 16-block
# tiles 1.8 ms (~0.1 ms per tile of op overhead); B=8 best at 16-32 blocks (tiles in cache).
_TILE_CODES = 1 << 20


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """lengths [B] -> [B, max_len] bool, True for the first lengths[b] entries."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def _take(t: torch.Tensor, table: torch.Tensor | None, c0: int, c1: int) -> torch.Tensor:
    """Blocks [c0, c1) of every sequence: [B, c1-c0, ...]."""
    return t[:, c0:c1] if table is None else t[table[:, c0:c1]]


def _product_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out (fp32) = a @ b computed in a's dtype (b cast to it); fp32 writes in place."""
    if a.dtype == torch.float32:
        torch.matmul(a, b.float(), out=out)
    else:
        out.copy_(torch.matmul(a, b.to(a.dtype)))


def _check_codes(kq: QuantKeys, vq: QuantValues, spec: KVQuantSpec, d: int) -> None:
    spec.check_head_dim(d)
    if kq.codes.shape[-1] * 8 != d * spec.k_bits or vq.codes.shape[-1] * 8 != d * spec.v_bits:
        raise ValueError(f"packed codes {kq.codes.shape[-1]}/{vq.codes.shape[-1]} bytes do not match "
                         f"K{spec.k_bits}V{spec.v_bits} at head_dim {d}")


def _key_scores(out: torch.Tensor, qg: torch.Tensor, kq: QuantKeys, table, n: int, spec: KVQuantSpec,
                chunk: int, qm: torch.Tensor) -> None:
    """qg [B, H, M, D] fp32 (softmax scale applied) -> out [B, H, M, n*G] fp32 scores.
    M <= G (decode): scale folded into q, one [M, D] x [D, G] product per block, min as q . m.
    M > G (prefill rows): folding costs M*D per block > G*D, so the tile is scaled instead
    (measured 4-7x faster at M=768); either way only a bounded tile is ever in fp32.
    qm: qg in the dtype of the M > G products (bf16 for a bf16 model, as the fp cache's
    prefill does)."""
    b, h, m, d = qg.shape
    g = spec.group_size
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        nc = c1 - c0
        codes = unpack_float(_take(kq.codes, table, c0, c1).permute(0, 3, 1, 2, 4), spec.k_bits)  # [B, H, nc, G, D]
        sc = _take(kq.scale, table, c0, c1).permute(0, 2, 1, 3).float()  # [B, H, nc, D]
        if m <= g:
            zr = _take(kq.zero, table, c0, c1).permute(0, 2, 3, 1).float()  # [B, H, D, nc]
            qs = qg.unsqueeze(2) * sc.unsqueeze(3)  # [B, H, nc, M, D]: scale folded into q
            s = torch.matmul(qs, codes.transpose(-1, -2))  # [B, H, nc, M, G]
            s += torch.matmul(qg, zr).transpose(-1, -2).unsqueeze(-1)  # min term [B, H, nc, M, 1]
            out[..., c0 * g : c1 * g] = s.permute(0, 1, 3, 2, 4).reshape(b, h, m, nc * g)
        else:
            zr = _take(kq.zero, table, c0, c1).permute(0, 2, 1, 3).float()  # [B, H, nc, D]
            tile = codes.mul_(sc.unsqueeze(3)).add_(zr.unsqueeze(3)).view(b, h, nc * g, d)
            _product_into(out[..., c0 * g : c1 * g], qm, tile.transpose(-1, -2))


def _value_sum(acc: torch.Tensor, p: torch.Tensor, vq: QuantValues, table, n: int, spec: KVQuantSpec,
               chunk: int, mm: torch.dtype = torch.float32) -> None:
    """acc [B, H, M, D] += sum_t p_t v_t over the prefix; p [B, H, M, n*G] fp32 weights.
    M <= G: scale folded into p per channel group, min as p @ m. M > G: tile scaled."""
    b, h, m, d = acc.shape
    g, gv = spec.group_size, spec.value_group  # tokens per block, channels per value group
    ng = d // gv
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        t = (c1 - c0) * g
        pc = p[..., c0 * g : c1 * g]  # [B, H, M, t]
        packed = _take(vq.codes, table, c0, c1).reshape(b, t, h, ng, -1)  # byte-aligned per channel group
        sc = _take(vq.scale, table, c0, c1).reshape(b, t, h, ng)
        zr = _take(vq.zero, table, c0, c1).reshape(b, t, h, ng)
        if m <= g:
            codes = unpack_float(packed.permute(0, 2, 3, 1, 4), spec.v_bits)  # [B, H, ng, t, Gv]
            # contiguous: a strided inner axis makes the broadcast multiply ~20x slower
            sc = sc.permute(0, 2, 3, 1).float().contiguous()  # [B, H, ng, t]
            ps = pc.unsqueeze(2) * sc.unsqueeze(3)  # [B, H, ng, M, t]: scale folded into p
            o = torch.matmul(ps, codes)  # [B, H, ng, M, Gv]
            acc += o.permute(0, 1, 3, 2, 4).reshape(b, h, m, d)
            mins = torch.matmul(pc, zr.permute(0, 2, 1, 3).float())  # [B, H, M, ng]
            acc += mins.unsqueeze(-1).expand(b, h, m, ng, gv).reshape(b, h, m, d)
        else:
            codes = unpack_float(packed.permute(0, 2, 1, 3, 4), spec.v_bits)  # [B, H, t, ng, Gv]
            sc = sc.permute(0, 2, 1, 3).float().unsqueeze(-1)  # [B, H, t, ng, 1]
            zr = zr.permute(0, 2, 1, 3).float().unsqueeze(-1)
            tile = codes.mul_(sc).add_(zr).view(b, h, t, d)
            acc += torch.matmul(pc.to(mm), tile.to(mm))


def _attend(qg, kq, vq, table, n, k_fp, v_fp, mask, spec, chunk, mm=torch.float32) -> torch.Tensor:
    """Joint softmax over prefix (n blocks) + window. qg [B, H, M, D] fp32, pre-scaled;
    mask [B, 1, M or 1, n*G + w] bool -> [B, H, M, D] fp32. mm: dtype of the many-row
    (M > G) products; scores, softmax and accumulators stay fp32."""
    b, h, m, d = qg.shape
    # per block a tile holds G*D codes and (fold path) the folded queries M*D
    chunk = chunk or max(1, _TILE_CODES // (b * h * max(spec.group_size, m) * d))
    nq = n * spec.group_size
    w = 0 if k_fp is None else k_fp.shape[1]
    if n:
        _check_codes(kq, vq, spec, d)
    qm = qg.to(mm)  # the query of the many-row and window products (a no-op in fp32)
    s = qg.new_empty(b, h, m, nq + w)  # joint scores [B, H, M, ctx]
    if n:
        _key_scores(s[..., :nq], qg, kq, table, n, spec, chunk, qm)
    if w:
        _product_into(s[..., nq:], qm, k_fp.permute(0, 2, 3, 1))  # [B, H, M, w]
    s.masked_fill_(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = qg.new_zeros(b, h, m, d)
    if n:
        _value_sum(o, p[..., :nq], vq, table, n, spec, chunk, mm)
    if w:
        o += torch.matmul(p[..., nq:].to(mm), v_fp.to(mm).transpose(1, 2))  # [B, H, M, D]
    return o


def _num_blocks(kq: QuantKeys | None, table) -> int:
    if kq is None:
        return 0
    return table.shape[1] if table is not None else kq.codes.shape[1]


def _kv_heads(kq: QuantKeys | None, k_fp: torch.Tensor | None, w: int) -> int:
    if w:
        return k_fp.shape[-2]
    if kq is None:
        raise ValueError("empty context: no quantized blocks and no fp window")
    return kq.scale.shape[-2]


def quantized_decode_attention(
    q: torch.Tensor,
    kq: QuantKeys | None,
    vq: QuantValues | None,
    k_fp: torch.Tensor | None,
    v_fp: torch.Tensor | None,
    spec: KVQuantSpec,
    *,
    block_mask: torch.Tensor | None = None,
    window_mask: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_blocks: int | None = None,
    kernel: ModuleType | None = None,
) -> torch.Tensor:
    """q [B, heads, D] -> [B, heads, D] (q's dtype). GQA: heads i*g..i*g+g-1 share kv head i.
    kq/vq: the quantized prefix (module docstring for layouts; None = no prefix);
    k_fp/v_fp [B, w, H, D]: the fp window (None = empty). Masks default to all-True.
    chunk_blocks: blocks unpacked per tile (default: ~2^20 codes per tile).
    kernel: the compiled native kernel (native.load_kernel) or None for torch ops; the
    same math either way (tests hold them to each other).
    Every row must attend to at least one token (else NaN, as in decode_attention)."""
    b, heads, d = q.shape
    n = _num_blocks(kq, block_table)
    w = 0 if k_fp is None else k_fp.shape[1]
    kvh = _kv_heads(kq, k_fp, w)
    scale = d ** -0.5 if scale is None else scale
    qg = q.float().view(b, kvh, heads // kvh, d) * scale  # [B, H, g, D]
    if kernel is not None and n and q.device.type == "cpu" and heads // kvh <= spec.group_size and d in HEAD_DIMS:
        o = _native(kernel, qg, kq, vq, block_table, n, k_fp, v_fp, block_mask, window_mask, spec)
        return o.reshape(b, heads, d).to(q.dtype)
    masks = []
    if n:
        bm = torch.ones(b, n, dtype=torch.bool, device=q.device) if block_mask is None else block_mask
        masks.append(bm.repeat_interleave(spec.group_size, dim=1))  # [B, n*G]
    if w:
        masks.append(torch.ones(b, w, dtype=torch.bool, device=q.device) if window_mask is None else window_mask)
    mask = torch.cat(masks, dim=1)[:, None, None, :] if masks else None  # [B, 1, 1, ctx]
    o = _attend(qg, kq, vq, block_table, n, k_fp, v_fp, mask, spec, chunk_blocks)
    return o.reshape(b, heads, d).to(q.dtype)


def _native(kernel, qg, kq, vq, table, n, k_fp, v_fp, block_mask, window_mask, spec) -> torch.Tensor:
    """Adapts quantized_decode_attention's arguments to the native kernel's pool form."""
    b, h, _, d = qg.shape
    _check_codes(kq, vq, spec, d)
    if table is None:  # gathered [B, n, ...] -> a pool of B*n blocks
        kq = QuantKeys(*(t.reshape(b * n, *t.shape[2:]) for t in kq))
        vq = QuantValues(*(t.reshape(b * n, *t.shape[2:]) for t in vq))
        table = torch.arange(b * n, device=qg.device).view(b, n)
    bm = torch.ones(b, n, dtype=torch.bool, device=qg.device) if block_mask is None else block_mask
    if k_fp is None:
        k_fp = v_fp = qg.new_zeros(b, 0, h, d)
    wm = torch.ones(b, k_fp.shape[1], dtype=torch.bool, device=qg.device) if window_mask is None else window_mask
    return native_decode_attention(kernel, qg, kq, vq, table, bm, k_fp, v_fp, wm, spec.k_bits, spec.v_bits)


def quantized_prefill_attention(
    q: torch.Tensor,
    kq: QuantKeys | None,
    vq: QuantValues | None,
    k_fp: torch.Tensor | None,
    v_fp: torch.Tensor | None,
    spec: KVQuantSpec,
    *,
    block_table: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_blocks: int | None = None,
    q_chunk: int | None = None,
) -> torch.Tensor:
    """Causal attention of the LAST q_len positions of one sequence's context
    ctx = n*G (quantized prefix) + w (fp window), like attention.prefill_attention.
    q [q_len, heads, D]; kq.codes [n, G, H, Dpk], scale/zero [n, H, D] (as from
    quantize_keys); vq.codes [n*G, H, Dpv], scale/zero [n*G, H, ng] (as from
    quantize_values); or pool tensors (see module docstring) with block_table [n] long.
    k_fp, v_fp [w, H, D]. Query rows are processed q_chunk at a time (default: so that
    rows * ctx <= 2^18), so scores stay bounded for long prompts. A bf16 q runs the
    products in bf16 (2x the fp32 GEMM rate on AVX512-BF16; the fp cache's prefill does
    the same), scores/softmax/accumulation in fp32; any other dtype runs them in fp32."""
    q_len, heads, d = q.shape
    g = spec.group_size
    table = None if block_table is None else block_table[None]
    if kq is not None and table is None:  # add the batch axis; values token-major -> blocks
        nb = kq.codes.shape[0]
        kq = QuantKeys(*(t[None] for t in kq))
        vq = QuantValues(*(t.reshape(1, nb, g, *t.shape[1:]) for t in vq))
    n = _num_blocks(kq, table)
    w = 0 if k_fp is None else k_fp.shape[0]
    k_fp = None if not w else k_fp[None]
    v_fp = None if not w else v_fp[None]
    kvh = _kv_heads(kq, k_fp, w)
    gq = heads // kvh
    ctx = n * g + w
    if q_len > ctx:
        raise ValueError(f"q_len={q_len} > context {ctx}")
    scale = d ** -0.5 if scale is None else scale
    qc = q_chunk or max(1, _PREFILL_SCORES // max(ctx * gq, 1))
    mm = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
    qg = q.float().view(q_len, kvh, gq, d).permute(1, 2, 0, 3) * scale  # [H, g, q_len, D]
    out = torch.empty(kvh, gq, q_len, d, dtype=torch.float32, device=q.device)
    pos = torch.arange(ctx, device=q.device)
    for r0 in range(0, q_len, qc):
        r1 = min(q_len, r0 + qc)
        rows = torch.arange(r0, r1, device=q.device) + (ctx - q_len)  # absolute positions
        causal = pos[None, :] <= rows[:, None]  # [r, ctx]
        mask = causal.expand(gq, r1 - r0, ctx).reshape(1, 1, gq * (r1 - r0), ctx)
        qr = qg[:, :, r0:r1].reshape(1, kvh, gq * (r1 - r0), d)
        o = _attend(qr, kq, vq, table, n, k_fp, v_fp, mask, spec, chunk_blocks, mm)
        out[:, :, r0:r1] = o.view(kvh, gq, r1 - r0, d)
    return out.permute(2, 0, 1, 3).reshape(q_len, heads, d).to(q.dtype)
