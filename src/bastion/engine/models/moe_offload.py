"""Expert offload: an MoE whose experts live in the model file (expert_store.py, an mmap)
with a byte-budgeted RAM tier of brought-in experts (expert_cache.py), placed per layer
and step by a policy and a calibrated cost model (moe_cost.py).

Policies (same kernels, same numbers; only time and bytes differ):
- resident: every expert read into RAM at start (the bound; needs the whole budget);
- fiddler: Fiddler as published, on a CPU-only box. Its GPU set becomes the RAM tier: a
  static placement of the most popular experts (offline profile: `place`), never changed;
  a missing expert runs where it lies (streamed from the mmap) unless the cost model says
  reading it in and running it costs less, exactly Fiddler's per-expert latency compare;
  with no reuse of a copy that never happens on a CPU (copy + run >= stream);
- lru: copy-on-miss: every missing expert is read into the tier (LRU eviction) and run;
- bastion: LFU-with-aging tier seeded from the same profile, admission against the victim
  (a cold expert is not cached, so it cannot evict a hot one); an admitted missing expert
  is read in by an I/O thread while the layer's resident experts run (hits first), one not
  admitted is streamed or read into a transient buffer, whichever the cost model says
  ends sooner; the next layer's experts are predicted from
  this layer's MoE input through the next layer's router (EdgeMoE's look-ahead) and
  prefetched on a second thread. A step waits only on a read of an expert it runs now: a
  prefetch not started when its layer comes is cancelled, a stale one skipped, and a wrong
  one is never waited on. Transient buffers (reads not kept) come out of a reserve of
  (top_k + 1) experts subtracted from the budget.

Exactness: every path computes `moe_cost.run_expert` on the file's values (cast to the
model dtype, or a quantized GGUF's blocks repacked as build_quantized repacks a resident
expert: expert_format.py), so the logits of every policy are those of `resident`, and a
quantized file's those of the model with every expert resident, bit for bit.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch
from torch import nn

from bastion.engine.models.expert_cache import RamTier
from bastion.engine.models.expert_format import ExpertFormat
from bastion.engine.models.expert_store import ExpertStore, Key
from bastion.engine.models.moe_cost import CostModel, run_expert

POLICIES = ("resident", "fiddler", "lru", "bastion")
_REPLACEMENT = {"resident": "static", "fiddler": "static", "lru": "lru", "bastion": "lfu"}


@dataclass
class OffloadStats:
    lookups: int = 0  # (layer, expert) activations
    hits: int = 0  # resident when its layer came
    waited: int = 0  # in flight (prefetch or read) when needed: the step waited on it
    streamed: int = 0  # run from the mmap
    fetched: int = 0  # read into RAM for this use (kept or transient)
    bytes_read: int = 0  # from the file, every path (prefetches that were wrong included)
    tokens: int = 0  # tokens through the first MoE layer
    wait_ms: float = 0.0  # time the step spent waiting on reads
    prefetch_issued: int = 0
    prefetch_skipped: int = 0  # cancelled or stale before reading
    predicted: int = 0  # look-ahead predictions made ...
    predicted_used: int = 0  # ... that the next layer did use
    next_used: int = 0  # experts the predicted layers used

    def as_dict(self) -> dict:
        d = asdict(self)
        d["hit_rate"] = self.hits / self.lookups if self.lookups else 0.0
        d["bytes_per_token"] = self.bytes_read / self.tokens if self.tokens else 0.0
        d["prefetch_recall"] = self.predicted_used / self.next_used if self.next_used else 0.0
        d["prefetch_precision"] = self.predicted_used / self.predicted if self.predicted else 0.0
        return d


class ExpertOffload:
    """One model's offloaded experts: the store, the RAM tier, the policy, the threads."""

    def __init__(self, store: ExpertStore, *, policy: str, budget_bytes: int, cost: CostModel,
                 dtype: torch.dtype | ExpertFormat, top_k: int, routers: dict[int, nn.Module] | None = None,
                 prefetch: bool = True, prefetch_max_tokens: int = 4):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.fmt = ExpertFormat.of(dtype)
        self.store, self.policy, self.cost, self.dtype, self.top_k = store, policy, cost, self.fmt.dtype, top_k
        self.expert_bytes = self.fmt.resident_bytes(store, next(iter(store.spans)))  # every expert's size
        self.reserve = (top_k + 1) * self.expert_bytes if policy == "bastion" else 0
        if policy == "resident":
            budget_bytes = max(budget_bytes, len(store.spans) * self.expert_bytes)
        if budget_bytes - self.reserve < 0:
            raise ValueError(f"expert budget {budget_bytes} B is below the {policy} policy's reserve "
                             f"({self.reserve} B = top_k + 1 experts)")
        self.budget = budget_bytes
        self.tier = RamTier(budget_bytes - self.reserve, _REPLACEMENT[policy])
        self.routers = routers or {}
        self.layers = store.layers
        self._next = dict(zip(self.layers, self.layers[1:]))
        self._pos = {layer: i for i, layer in enumerate(self.layers)}
        self.prefetch = prefetch and policy == "bastion"
        self.prefetch_max_tokens = prefetch_max_tokens
        self.stats = OffloadStats()
        self.counts: dict[Key, int] = {}  # activations per expert (a profile for `place`)
        self._lock = threading.Lock()
        self._pending: dict[Key, Future] = {}
        self._plan: dict[Key, tuple[str, Future | None]] = {}
        self._pred: dict[int, set[int]] = {}
        self._step, self._cursor = 0, (0, -1)  # (step, position of the layer now running)
        self._io = ThreadPoolExecutor(1, "moe-read") if policy == "bastion" else None
        self._pf = ThreadPoolExecutor(1, "moe-prefetch") if self.prefetch else None
        if policy == "resident":
            for key in store.spans:
                self.tier.put(key, self._load(key), self.expert_bytes)

    # ------------------------------------------------------------------ set-up
    def place(self, popularity: dict[Key, int]) -> None:
        """Fill the tier with the most popular experts that fit (Fiddler's offline profile;
        bastion's warm start) and seed the frequency scores with the profile."""
        ranked = sorted(popularity, key=lambda k: -popularity[k])
        top = max(popularity.values(), default=1)
        self.tier.seed({k: popularity[k] / top for k in ranked})
        for k in ranked:
            if self.tier.used + self.expert_bytes > self.tier.capacity:
                break
            self.tier.put(k, self._load(k), self.expert_bytes)

    def reset_stats(self) -> None:
        self.stats = OffloadStats()

    def close(self) -> None:
        for ex in (self._io, self._pf):
            if ex is not None:
                ex.shutdown(wait=True, cancel_futures=True)

    def _load(self, key: Key):
        w = self.store.read(key)
        self._count_bytes(self.store.expert_bytes(key))
        return self.fmt.weights(self.store.spans[key], w)

    def _count_bytes(self, n: int) -> None:
        with self._lock:
            self.stats.bytes_read += n

    # ------------------------------------------------------------------ per layer
    def schedule(self, layer: int, active: list[int], counts: list[int], x: torch.Tensor) -> list[int]:
        """Decide how each active expert of `layer` runs; return the order to run them in.
        x: [T, H] the layer's MoE input (for the next layer's look-ahead)."""
        s, pos = self.stats, self._pos[layer]
        if pos == 0:
            self._step += 1
            s.tokens += x.shape[0]
        self._cursor = (self._step, pos)
        keys = [(layer, e) for e in active]
        s.lookups += len(keys)
        for k in keys:
            self.counts[k] = self.counts.get(k, 0) + 1
        pred = self._pred.pop(layer, None)
        if pred is not None:
            used = pred & set(active)
            s.predicted += len(pred)
            s.predicted_used += len(used)
            s.next_used += len(active)
        self.tier.touch_layer(layer, keys)
        self.tier.pin(keys)
        plan, futs, order = {}, {}, {"hit": [], "stream": [], "wait": [], "read": [], "fetch": []}
        overlap = 0.0  # ms of resident work this layer runs before the reads are needed
        for e, k in zip(active, keys):
            if k in self.tier:
                plan[k] = "hit"
                overlap += self.cost.compute(counts[e])
                continue
            fut = self._pending.get(k)
            if fut is not None and not fut.cancel():
                plan[k], futs[k] = "wait", fut  # being read: needed now, so worth the wait
                continue
            if fut is not None:  # a prefetch that had not started: cancelled, read on demand
                self._pending.pop(k, None)
                s.prefetch_skipped += 1
            plan[k] = self._miss(k, counts[e])
        reads = transient = 0
        for e, k in zip(active, keys):
            if plan[k] == "read":  # bastion: read on the I/O thread, or stream when the model says cheaper
                reads += 1
                keep = self.tier.would_admit(k, self.expert_bytes)
                queued = max(0.0, reads * self.cost.read() - overlap) + self.cost.compute(counts[e])
                # an admitted expert is brought in (later uses hit); one that is not is streamed
                # when the cost model says that is cheaper now, or when the reserve is used up
                if not keep and (self.cost.stream(counts[e]) < queued or transient >= self.top_k):
                    plan[k] = "stream"
                else:
                    transient += not keep
                    futs[k] = self._pending[k] = self._io.submit(self._read, k, keep, None)
            order[plan[k]].append(e)
            s.hits += plan[k] == "hit"
            s.waited += plan[k] == "wait"
        self._plan.update({k: (plan[k], futs.get(k)) for k in keys})
        if self.prefetch and x.shape[0] <= self.prefetch_max_tokens and layer in self._next:
            self._lookahead(self._next[layer], x)
        return order["hit"] + order["stream"] + order["fetch"] + order["wait"] + order["read"]

    def _miss(self, key: Key, n: int) -> str:
        if self.policy == "lru":
            return "fetch"
        if self.policy == "fiddler":  # Fiddler's compare: run where it lies vs bring in and run
            return "stream" if self.cost.stream(n) <= self.cost.read() + self.cost.compute(n) else "fetch"
        if self.policy == "bastion":
            return "read"
        raise RuntimeError(f"expert {key} is not resident under the resident policy")

    def run(self, key: Key, x: torch.Tensor) -> torch.Tensor:
        """x [n, H] -> [n, H] through expert `key`, as schedule planned it."""
        how, fut = self._plan.pop(key, ("stream", None))
        w = self.tier.get(key) if how == "hit" else None
        if how in ("wait", "read"):
            t0 = time.perf_counter()
            w = fut.result() if fut is not None else None
            self.stats.wait_ms += 1e3 * (time.perf_counter() - t0)
            self.stats.fetched += how == "read"
        elif how == "fetch":
            w = self._load(key)
            self.stats.fetched += 1
            if self.policy == "lru":
                self.tier.put(key, w, self.expert_bytes)
        if w is None:  # streamed (planned, or a read that came back empty)
            self.stats.streamed += 1
            self._count_bytes(self.store.expert_bytes(key))
            y = run_expert(x, self.fmt.weights(self.store.spans[key], self.store.view(key)))
            if self.store.drop_page_cache:
                self.store.release(key)
            return y
        return run_expert(x, w)

    # ------------------------------------------------------------------ background reads
    def _read(self, key: Key, keep: bool, target: tuple[int, int] | None):
        """On an I/O thread: read `key`, keep it in the tier if admitted. `target` (step,
        layer position) marks a prefetch: skipped if that layer has already begun."""
        try:
            if target is not None and self._cursor >= target:
                with self._lock:
                    self.stats.prefetch_skipped += 1
                return None
            w = self.tier.get(key)
            if w is not None:
                return w
            w = self._load(key)
            if keep:
                self.tier.put(key, w, self.expert_bytes)
            return w
        finally:
            self._pending.pop(key, None)

    def _lookahead(self, nxt: int, x: torch.Tensor) -> None:
        router = self.routers.get(nxt)
        if router is None:
            return
        probs = torch.softmax(router(x).float(), dim=-1)
        pred = set(torch.topk(probs, self.top_k, dim=-1).indices.reshape(-1).tolist())
        self._pred[nxt] = pred
        target = (self._step, self._pos[nxt])
        for e in sorted(pred):
            k = (nxt, e)
            if k in self.tier or k in self._pending or not self.tier.would_admit(k, self.expert_bytes):
                continue
            self.stats.prefetch_issued += 1
            self._pending[k] = self._pf.submit(self._read, k, True, target)


class OffloadedExperts(nn.Module):
    """A layer's experts, offloaded: what MoEMLP calls (`schedule`, then forward per expert)."""

    def __init__(self, layer: int, offload: ExpertOffload):
        super().__init__()
        self.layer = layer
        self.offload = offload  # NOTE: shared by every layer; not a submodule (no parameters)

    def schedule(self, active: list[int], counts: list[int], x: torch.Tensor) -> list[int]:
        return self.offload.schedule(self.layer, active, counts, x)

    def forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.offload.run((self.layer, e), x)


def install(model: nn.Module, offload: ExpertOffload) -> None:
    """Swap every MoE layer's experts for offloaded ones (dropping resident experts, if any)
    and give the offload the routers it looks ahead with. model.moe_offload = offload."""
    for i, layer in enumerate(model.layers):
        if layer.mlp is None:
            continue
        if i not in offload.layers:
            raise ValueError(f"layer {i} is an MoE layer but the file has no experts for it")
        layer.mlp.experts = OffloadedExperts(i, offload)
        offload.routers[i] = layer.mlp.gate
    model.moe_offload = offload


def offload_model(model: nn.Module, path, *, policy: str, budget_bytes: int, dtype: torch.dtype | ExpertFormat,
                  drop_page_cache: bool = False, prefetch: bool = True, cost: CostModel | None = None) -> ExpertOffload:
    """Open the experts of the model file at `path` (GGUF or HF directory), calibrate the
    cost model on them (unless given one), and install the offload into `model`. `dtype`:
    the model's, or the ExpertFormat that also names a quantized file's kernel."""
    from bastion.engine.models.moe_cost import calibrate

    fmt = ExpertFormat.of(dtype)
    store = ExpertStore.open(path, drop_page_cache=drop_page_cache)
    cost = cost or calibrate(store, fmt)
    offload = ExpertOffload(store, policy=policy, budget_bytes=budget_bytes, cost=cost, dtype=fmt,
                            top_k=model.arch.num_experts_per_tok, prefetch=prefetch)
    install(model, offload)
    return offload


def build_offloaded(ckpt, *, dtype: torch.dtype, max_len: int, policy: str, budget_bytes: int,
                    drop_page_cache: bool = False, prefetch: bool = True, cost: CostModel | None = None,
                    kernel=None, activations: str = "auto") -> tuple[nn.Module, ExpertOffload]:
    """The model of a checkpoint loaded with `skip_experts` (loader.py), its experts offloaded
    to the file it came from: (model in `dtype`, its ExpertOffload). A checkpoint whose other
    weights are kept quantized is built as build_quantized builds it (fp32 activations,
    `kernel` and `activations` for every quantized matmul, experts' included)."""
    from bastion.engine.models.llama import LlamaForCausalLM
    from bastion.engine.models.quantized_model import build_quantized, has_quantized

    fmt = ExpertFormat(dtype, kernel, activations)
    opts = dict(policy=policy, budget_bytes=budget_bytes, dtype=fmt, drop_page_cache=drop_page_cache,
                prefetch=prefetch, cost=cost)
    if has_quantized(ckpt.weights):
        if dtype != torch.float32:
            raise ValueError(f"a quantized model runs in float32 activations, not {dtype}")
        made = []
        model = build_quantized(ckpt.arch, max_len, ckpt.weights, kernel, activations,
                                experts=lambda m: made.append(offload_model(m, ckpt.path, **opts)))
        return model, made[0]
    model = LlamaForCausalLM(ckpt.arch, max_len)
    offload = offload_model(model, ckpt.path, **opts)
    model.load_hf_state_dict(ckpt.weights)  # the experts are offloaded already: not loaded
    model = model.to(dtype=dtype).eval()
    model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()
    return model, offload


def moe_stats(model: nn.Module) -> dict[str, int]:
    """EngineStats' expert-offload fields for `model` (empty when nothing is offloaded)."""
    off = getattr(model, "moe_offload", None)
    if off is None:
        return {}
    s = off.stats
    return {"moe_expert_lookups": s.lookups, "moe_expert_hits": s.hits, "moe_bytes_read": s.bytes_read,
            "moe_tokens": s.tokens}
