"""The cost model of expert offload, calibrated by micro-benchmarks at start-up on the
model's own experts (nothing hard-coded):

- compute(n): one resident expert over n tokens, measured on a grid of n and interpolated
  piecewise-linearly. On a CPU this curve is flat while the GEMMs are bandwidth-bound
  (issue 22 measured a Mixtral-shaped bf16 expert at ~75-80 ms for 1-2 tokens, 129 ms at 8),
  which is why Fiddler's linear `a*n` CPU model is not used;
- stream(n): the same expert run straight from the mmap as the store leaves it (page cache
  dropped when the store is "cold", so this includes the disk read through page faults);
- read: pread of one expert into owned RAM, made runnable (cast to the model's dtype, or a
  quantized expert's blocks repacked): what a cache fill or a prefetch pays.

`run_expert` is the one kernel every path uses (resident, streamed, prefetched): SwiGLU
with gate and up as two GEMMs, so a streamed expert's output is bit-identical to the
cached one's.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

TOKENS = (1, 2, 4, 8, 16, 32, 64)


def run_expert(x: torch.Tensor, w) -> torch.Tensor:
    """x [n, H] -> [n, H]; w = gate [I, H], up [I, H], down [H, I] (any dtype: cast to x's,
    a copy only when the file's dtype is not the model's), or a quantized expert's one-expert
    ModuleExperts (expert_format.py)."""
    if isinstance(w, nn.Module):
        return w(0, x)
    g, u, d = (t if t.dtype == x.dtype else t.to(x.dtype) for t in w)
    return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)


@dataclass(frozen=True)
class CostModel:
    tokens: tuple[int, ...]
    compute_ms: tuple[float, ...]  # resident, per n in tokens
    stream_ms: tuple[float, ...]  # from the mmap as the store leaves it, per n
    read_ms: float  # pread one expert into RAM
    expert_bytes: int

    def __post_init__(self) -> None:
        if not self.tokens or len(self.compute_ms) != len(self.tokens) or len(self.stream_ms) != len(self.tokens):
            raise ValueError("tokens, compute_ms and stream_ms must be non-empty and of equal length")

    def compute(self, n: int) -> float:
        return _interp(self.tokens, self.compute_ms, n)

    def stream(self, n: int) -> float:
        return _interp(self.tokens, self.stream_ms, n)

    def read(self) -> float:
        return self.read_ms

    def as_dict(self) -> dict:
        return asdict(self)


def _interp(xs: tuple[int, ...], ys: tuple[float, ...], n: int) -> float:
    """Piecewise-linear in n; beyond the grid, linear from the last two points."""
    if n <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if n <= xs[i] or i == len(xs) - 1:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 + (y1 - y0) * (n - x0) / (x1 - x0)
    return ys[-1]


def calibrate(store, fmt, *, tokens: tuple[int, ...] = TOKENS, samples: int = 3) -> CostModel:
    """Measure on `samples` experts of the store (spread over its layers): medians. `fmt`:
    the ExpertFormat the offload runs them in (a torch.dtype: dense experts in it)."""
    from bastion.engine.models.expert_format import ExpertFormat

    fmt = ExpertFormat.of(fmt)
    dtype, prep = fmt.dtype, fmt.weights
    keys = list(store.spans)
    keys = [keys[i * len(keys) // samples] for i in range(samples)]
    hidden = store.spans[keys[0]][0].shape[1]
    gen = torch.Generator().manual_seed(0)
    xs = {n: torch.randn(n, hidden, generator=gen).to(dtype) for n in tokens}
    comp = {n: [] for n in tokens}
    strm = {n: [] for n in tokens}
    reads = []
    with torch.inference_mode():
        for key in keys:
            store.release(key)
            t0 = time.perf_counter()
            w = prep(store.spans[key], store.read(key))  # a fill pays the cast or the repack too
            reads.append(time.perf_counter() - t0)
            run_expert(xs[tokens[0]], w)  # warm the kernels
            for n in tokens:
                comp[n].append(_time(lambda n=n: run_expert(xs[n], w)))
                if not store.drop_page_cache:
                    run_expert(xs[n], prep(store.spans[key], store.view(key)))  # warm: the mapping stays
                else:
                    store.release(key)
                strm[n].append(_time(lambda n=n: run_expert(xs[n], prep(store.spans[key], store.view(key)))))
                if store.drop_page_cache:
                    store.release(key)

    def med(v: list[float]) -> float:
        return 1e3 * statistics.median(v)
    return CostModel(tuple(tokens), tuple(med(comp[n]) for n in tokens), tuple(med(strm[n]) for n in tokens),
                     med(reads), store.expert_bytes(keys[0]))


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
