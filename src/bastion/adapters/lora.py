"""PEFT LoRA adapters mapped onto the engine's fused projections, and the batched
multi-LoRA delta.

Our layers fuse q/k/v into `qkv_proj` and gate/up into `gate_up_proj`, so an adapter's
A factors are fused too: A = [A_q; A_k; A_v] (each zero-padded to the rank cap), one
matmul t = x @ A^T, then each sub-module's B_i applies to its slice of t and adds into
its slice of the output: [s_q B_q A_q x | s_k B_k A_k x | s_v B_v A_v x], the PEFT
result. (A block-diagonal fused B would do it in one matmul but reads 2-3x more bytes.)
The scale s = lora_alpha / r (or / sqrt(r) with rsLoRA) is folded into B.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from bastion.engine.models.arch import ModelArch
from bastion.safe_io import read_regular

# fused module -> its PEFT sub-modules, in output order
FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}
SUB_TO_FUSED = {sub: fused for fused, subs in FUSED.items() for sub in subs}
MAX_CONFIG_BYTES = 1 << 20  # adapter_config.json (the gate's own limit is smaller)
PROMPT_ROWS = 16  # a slot's group of at least this many rows (a prompt chunk) runs as 16-bit GEMMs
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be served on this base model; the message says why."""


def module_shapes(arch: ModelArch) -> dict[str, tuple[int, int]]:
    """PEFT module name -> (in_features, out_features) on this base."""
    h, i, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    return {
        "q_proj": (h, arch.num_heads * d), "k_proj": (h, arch.num_kv_heads * d),
        "v_proj": (h, arch.num_kv_heads * d), "o_proj": (arch.num_heads * d, h),
        "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
    }


@dataclass
class LoraAdapter:
    name: str
    path: str
    rank: int  # largest per-module rank
    # (layer, fused module) -> per sub-module (in FUSED order): (A [r, in], s*B [out, r]) or None
    weights: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor] | None]]


def load_peft_adapter(name: str, path: str | Path, arch: ModelArch) -> LoraAdapter:
    """Read adapter_config.json + adapter_model.safetensors (never a pickle)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, w_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file() or not w_file.is_file():
        raise AdapterError(f"{path}: expected adapter_config.json and adapter_model.safetensors")
    try:
        cfg = json.loads(read_regular(cfg_file, MAX_CONFIG_BYTES))
    except (OSError, ValueError) as e:
        raise AdapterError(f"{cfg_file}: {e}") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_file}: not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    try:
        tensors = load_file(str(w_file))
    except Exception as e:  # safetensors raises its own error type on a corrupt file
        raise AdapterError(f"{w_file}: not a readable safetensors file ({e})") from e
    shapes = module_shapes(arch)
    per_sub: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None or m.group(3) not in shapes:
            raise AdapterError(f"{path}: unexpected tensor {key!r}")
        layer, sub = int(m.group(1)), m.group(3)
        if layer >= arch.num_layers:
            raise AdapterError(f"{path}: {key} targets layer {layer}; the base has {arch.num_layers}")
        per_sub.setdefault((layer, sub), {})[m.group(4)] = t.float()
    alpha, r0 = cfg.get("lora_alpha", cfg.get("r", 8)), cfg.get("r", 8)
    weights, max_rank = {}, 0
    for (layer, fused), subs in _group_by_fused(per_sub).items():
        parts: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for sub in FUSED[fused]:
            ab = subs.get(sub)
            if ab is None:
                parts.append(None)
                continue
            a, b = ab.get("A"), ab.get("B")
            if a is None or b is None:
                raise AdapterError(f"{path}: layer {layer} {sub} lacks lora_A or lora_B")
            r = a.shape[0]
            if a.shape != (r, shapes[sub][0]) or b.shape != (shapes[sub][1], r):
                raise AdapterError(f"{path}: layer {layer} {sub} shapes A{tuple(a.shape)} B{tuple(b.shape)} "
                                   f"do not fit in={shapes[sub][0]} out={shapes[sub][1]}")
            r_cfg = cfg.get("rank_pattern", {}).get(sub, r0)
            a_cfg = cfg.get("alpha_pattern", {}).get(sub, alpha)
            if r != r_cfg:
                raise AdapterError(f"{path}: layer {layer} {sub} has rank {r}, config says {r_cfg}")
            scale = a_cfg / math.sqrt(r) if cfg.get("use_rslora") else a_cfg / r
            parts.append((a, b * scale))
            max_rank = max(max_rank, r)
        weights[(layer, fused)] = parts
    if not weights:
        raise AdapterError(f"{path}: the adapter holds no LoRA tensors")
    return LoraAdapter(name=name, path=str(path), rank=max_rank, weights=weights)


def _group_by_fused(per_sub):
    out: dict[tuple[int, str], dict[str, dict[str, torch.Tensor]]] = {}
    for (layer, sub), ab in per_sub.items():
        out.setdefault((layer, SUB_TO_FUSED[sub]), {})[sub] = ab
    return out


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
