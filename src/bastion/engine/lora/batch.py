"""The batched multi-LoRA delta of one step: rows grouped by adapter slot, one matmul per
group over a slice of the stacked factors (registry.py).

A = [A_q; A_k; A_v] (each zero-padded to the rank cap) is one matmul t = x @ A^T; then
each sub-module's B_i applies to its slice of t and adds into its slice of the output:
[s_q B_q A_q x | s_k B_k A_k x | s_v B_v A_v x], the PEFT result. (A block-diagonal fused
B would do it in one matmul but reads 2-3x more bytes.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROMPT_ROWS = 16  # a slot's group of at least this many rows (a prompt chunk) runs as 16-bit GEMMs


@dataclass
class LoraGroup:
    """Rows of one step that run as one batched matmul over the slot range [lo, hi]:
    slot lo + i's rows are x[gather[i]] (padded; padding is dropped), or, when `gather`
    is None, the contiguous rows start + i*m ... start + (i+1)*m (each slot in the range
    holds exactly m consecutive rows: a prompt chunk, or decodes sorted by slot).

    NOTE: a group reads the stacked weights as a slice (a view) over [lo, hi], never
    gathering copies of them per layer."""

    lo: int
    hi: int
    m: int
    start: int = 0
    gather: torch.Tensor | None = None  # [hi - lo + 1, m] long row ids, padded
    rows: torch.Tensor | None = None  # [k] long: real row ids, in flattened [n*m] order of `keep`
    keep: torch.Tensor | None = None  # [k] long: real positions of the flattened [n*m]; None = all

    def take(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, in] -> [n, m, in]
        if self.gather is None:
            n = self.hi - self.lo + 1
            return x[self.start : self.start + n * self.m].view(n, self.m, x.shape[1])
        return x[self.gather]

    def put(self, dst: torch.Tensor, d: torch.Tensor) -> None:  # d: [n, m, cols] -> dst[rows] += d
        d = d.flatten(0, 1)
        if self.gather is None:
            dst[self.start : self.start + d.shape[0]].add_(d)  # NOTE: add_ casts fp32 -> dst dtype
        else:
            dst.index_add_(0, self.rows, (d if self.keep is None else d[self.keep]).to(dst.dtype))


@dataclass
class LoraBatch:
    """This step's rows grouped for batched LoRA matmuls (built once per step, shared by
    every layer). Rows without an adapter are in no group.

    Single-row segments (decodes) form one group over their slot range; each prompt chunk
    is its own contiguous group. NOTE: one padded [slots, max rows] gather over both would
    pad every decode to the chunk's length (measured: a 512-token prefill step with 8
    adapters took 4x the base model's time that way)."""

    groups: list[LoraGroup]

    @classmethod
    def build(cls, segments: list[tuple[int, int]], device: torch.device) -> "LoraBatch | None":
        """segments: (slot, rows) in row order; slot 0 = no adapter."""
        groups, singles, row = [], [], 0
        for slot, n in segments:
            if slot and n > 1:
                groups.append(LoraGroup(slot, slot, n, start=row))
            elif slot:
                singles.append((row, slot))
            row += n
        if singles:
            groups.insert(0, _single_rows_group(singles, device))
        return cls(groups) if groups else None


def _single_rows_group(singles: list[tuple[int, int]], device: torch.device) -> LoraGroup:
    rows0, slots = [r for r, _ in singles], [s for _, s in singles]
    lo, hi = min(slots), max(slots)
    by_slot: dict[int, list[int]] = {}
    for row, slot in singles:
        by_slot.setdefault(slot, []).append(row)
    m = max(len(r) for r in by_slot.values())
    if (len(singles) == m * (hi - lo + 1) and slots == sorted(slots)
            and rows0 == list(range(rows0[0], rows0[0] + len(rows0)))):
        # every slot of the range holds m consecutive rows, in slot order (e.g. 8 decodes on
        # 8 adapters, or 8 on one): a view of x, no gather, no scatter
        return LoraGroup(lo, hi, m, start=rows0[0])
    gather = torch.zeros(hi - lo + 1, m, dtype=torch.long)
    rows, keep = [], []
    for slot, r in sorted(by_slot.items()):
        i = slot - lo
        gather[i, : len(r)] = torch.tensor(r)
        rows += r
        keep += range(i * m, i * m + len(r))
    dense = len(keep) == gather.numel()
    return LoraGroup(lo, hi, m, gather=gather.to(device), rows=torch.tensor(rows, device=device),
                     keep=None if dense else torch.tensor(keep, device=device))


def add_lora(out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bs: list[tuple[int, torch.Tensor]],
             batch: LoraBatch, subs: tuple[int, ...] | None = None) -> None:
    """out[rows] += x[rows] @ A[slot]^T @ B[slot]^T per sub-module, batched over slots.
    x: [T, in]; A_T: [slots, in, subs*R]; Bs: (output column offset, B_T_i [slots, R, out_i]);
    out: [T, out_total], updated in place. `subs`: the sub-modules some adapter of this
    batch targets (None = all); the others' B are all zero here and are skipped."""
    r = A.shape[2] // len(Bs)
    every = subs is None or len(subs) == len(Bs)
    for g in batch.groups:
        if g.m >= PROMPT_ROWS and g.lo == g.hi and g.gather is None and x.dtype != A.dtype:
            _add_lora_chunk(out, x, A, Bs, g, subs, r)
            continue
        sl = slice(g.lo, g.hi + 1)
        t = torch.bmm(g.take(x).to(A.dtype), A[sl])  # [n, m, subs*R]
        if every:  # sub-module outputs tile the fused output's columns in order: one put for all
            if len(Bs) == 1:
                g.put(out, torch.bmm(t, Bs[0][1][sl]))
            else:
                g.put(out, torch.cat([torch.bmm(t[..., i * r : (i + 1) * r], B[sl]) for i, (_, B) in enumerate(Bs)],
                                     dim=-1))
            continue
        for i in subs:  # e.g. q and v of qkv (PEFT's default targets): k's columns stay untouched
            col, B = Bs[i]
            g.put(out[:, col : col + B.shape[2]], torch.bmm(t[..., i * r : (i + 1) * r], B[sl]))


def _add_lora_chunk(out, x, A, Bs, g: LoraGroup, subs, r: int) -> None:
    """One slot's prompt chunk (m >= PROMPT_ROWS rows) in x's 16-bit dtype: the slot's
    factors are cast per call (small: [in, subs*R]) and the GEMMs run in bf16, which on
    CPU is 2-3x faster than fp32 at these shapes (measured: [256, 576] x [576, 48] 37 vs
    89 us); decode-sized groups stay fp32, where bf16 bmm is the slow one."""
    xs = x[g.start : g.start + g.m]  # [m, in]
    t = torch.mm(xs, A[g.lo].to(x.dtype))  # [m, subs*R]
    for i in range(len(Bs)) if subs is None else subs:
        col, B = Bs[i]
        out[g.start : g.start + g.m, col : col + B.shape[2]] += torch.mm(t[:, i * r : (i + 1) * r], B[g.lo].to(x.dtype))


@dataclass
class LoraStep:
    """What the model needs to add adapter deltas this step. `plan`: (layer, fused module)
    -> the sub-modules that at least one adapter of this batch targets; modules absent
    from it are skipped (an adapter on q/v of the top layers costs only those)."""

    stacks: dict
    batch: LoraBatch
    plan: dict[tuple[int, str], tuple[int, ...]] | None = None

    def apply(self, layer: int, module: str, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        subs = None if self.plan is None else self.plan.get((layer, module))
        if self.plan is not None and not subs:
            return out
        A, Bs = self.stacks[(layer, module)]
        add_lora(out, x, A, Bs, self.batch, subs)
        return out
