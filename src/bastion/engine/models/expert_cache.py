"""The RAM tier of expert offload: a byte-budgeted resident set of brought-in experts.

`ExpertTier` is what a tier must answer (holds? the weights, insert with eviction, pins);
`RamTier` is the one built here. A GPU tier would be a second ExpertTier whose weights live
on the device (the controller would then also weigh CPU-vs-GPU execution, Fiddler's
question proper). It is NOT built or tested: this machine has no GPU, and
`--moe-gpu-memory` is refused when no GPU is present.

Replacement: `lru` (least recently used), `lfu` (least frequently used with exponential
aging: score = sum over uses of decay^(age in uses of the layer), so yesterday's favourite
fades), `static` (never evicts: a placement fixed at start, Fiddler's). A frequency table
is kept for every expert seen, resident or not, so admission can compare a candidate with
the victim it would evict (`would_admit`). Pinned experts (the ones the current layer is
running) are never evicted: eviction only drops the tier's reference, a running expert
keeps its tensors alive anyway, but the byte budget would then be briefly exceeded.
Thread-safe: the prefetch thread inserts while the step thread looks up.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

Key = tuple[int, int]  # (layer, expert)
Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate [I, H], up [I, H], down [H, I]
REPLACEMENTS = ("lru", "lfu", "static")


class ExpertTier:
    """A place experts can be held and run from."""

    name = "abstract"

    def get(self, key: Key) -> Weights | None:
        raise NotImplementedError

    def put(self, key: Key, weights: Weights, nbytes: int) -> bool:
        raise NotImplementedError

    def __contains__(self, key: Key) -> bool:
        raise NotImplementedError


class RamTier(ExpertTier):
    name = "ram"

    def __init__(self, capacity_bytes: int, replacement: str = "lru", decay: float = 0.98):
        if replacement not in REPLACEMENTS:
            raise ValueError(f"replacement must be one of {REPLACEMENTS}, got {replacement!r}")
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity, self.replacement, self.decay = capacity_bytes, replacement, decay
        self.used = 0
        self._items: OrderedDict[Key, tuple[Weights, int]] = OrderedDict()  # LRU order: oldest first
        self._freq: dict[Key, tuple[float, int]] = {}  # key -> (score, tick of last update)
        self._tick: dict[int, int] = {}  # layer -> uses of that layer so far (the aging clock)
        self._pins: set[Key] = set()
        self.lock = threading.RLock()
        self.evictions = 0

    def __contains__(self, key: Key) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[Key]:
        with self.lock:
            return list(self._items)

    def get(self, key: Key) -> Weights | None:
        with self.lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def touch_layer(self, layer: int, used: list[Key]) -> None:
        """One use of `layer` that activated `used`: the aging clock ticks, their scores grow."""
        with self.lock:
            tick = self._tick.get(layer, 0) + 1
            self._tick[layer] = tick
            for k in used:
                self._freq[k] = (self.score(k) + 1.0, tick)

    def score(self, key: Key) -> float:
        s, t = self._freq.get(key, (0.0, 0))
        return s * self.decay ** (self._tick.get(key[0], 0) - t)

    def seed(self, scores: dict[Key, float]) -> None:
        """Start the frequency scores from a profile (placement at start-up)."""
        with self.lock:
            for k, v in scores.items():
                self._freq[k] = (float(v), self._tick.get(k[0], 0))

    def pin(self, keys: list[Key]) -> None:
        with self.lock:
            self._pins = set(keys)

    def _victim(self) -> Key | None:
        free = [k for k in self._items if k not in self._pins]
        if not free or self.replacement == "static":
            return None
        if self.replacement == "lru":
            return free[0]
        return min(free, key=self.score)

    def would_admit(self, key: Key, nbytes: int) -> bool:
        """Would `put` keep this expert? (room, or a victim colder than it: LFU admission)"""
        with self.lock:
            if key in self._items:
                return True
            if nbytes > self.capacity:
                return False
            if self.used + nbytes <= self.capacity:
                return True
            if self.replacement != "lfu":
                return self.replacement == "lru"
            v = self._victim()
            return v is not None and self.score(v) < self.score(key)

    def put(self, key: Key, weights: Weights, nbytes: int) -> bool:
        """Insert, evicting as the replacement says; False (nothing changed) when it cannot fit."""
        with self.lock:
            if key in self._items:
                return True
            if nbytes > self.capacity:
                return False
            while self.used + nbytes > self.capacity:
                v = self._victim()
                if v is None:
                    return False
                self.used -= self._items.pop(v)[1]
                self.evictions += 1
            self._items[key] = (weights, nbytes)
            self.used += nbytes
            return True

    def clear(self) -> None:
        with self.lock:
            self._items.clear()
            self.used = 0
