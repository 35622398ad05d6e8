"""Block manager: which KV blocks each request's tracks own, ref counts, sequence slots,
and the prefix cache (prefix_cache.py) when the KV cache supports one.

The scheduler sees memory only through its answers: `allocate` says whether a request
fits (taking its blocks if so), `match_prefix` what it could reuse, `free_request` gives
everything back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from bastion.engine.kv_cache.prefix_cache import PrefixCache
from bastion.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_seq_slots: int | None = None, blocks_for: Callable[[int], int] | None = None):
        self.num_blocks, self.block_size = num_blocks, block_size
        # tokens -> blocks a sequence must own (the cache says: a quantized one keeps its
        # newest tokens in a per-sequence window, outside the blocks)
        self.blocks_for = blocks_for or self.blocks_needed
        # NOTE: caches with per-sequence state (a full-precision window) have a fixed number of
        # sequence slots; a track holds one exactly while it holds blocks.
        self.num_seq_slots = num_seq_slots
        self.free_seq_slots = None if num_seq_slots is None else list(range(num_seq_slots - 1, -1, -1))
        self.prefix = PrefixCache(num_blocks, block_size) if enable_prefix_caching else None
        self.ref_count = [0] * num_blocks
        # NOTE: free blocks in eviction order (oldest first); cached ones keep their hash.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))

    # ------------------------------------------------------------ queries
    @property
    def prefix_caching(self) -> bool:
        return self.prefix is not None

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------ allocation
    def allocate(self, req: Request, num_new_tokens: int, prefix_hits: list[list[int]] | None = None) -> bool:
        """Make sure every track of `req` owns blocks for num_computed + num_new tokens.
        `prefix_hits` (from `match_prefix`, first allocation only: one list per track, all
        of one length) are shared cached blocks covering the head of the prompt; taking
        them advances num_computed_tokens. Returns False, changing nothing, if the pool
        cannot hold it."""
        hits = prefix_hits or [[] for _ in req.tracks]
        n_hit = len(hits[0])
        want = self.blocks_for(max(req.num_computed_tokens, n_hit * self.block_size) + num_new_tokens)
        need = [max(want - len(t.block_ids) - len(h), 0) for t, h in zip(req.tracks, hits)]
        # hits that sit in the free list (counted once: two tracks may share a block)
        reusable = len({b for h in hits for b in h if self.ref_count[b] == 0})
        if sum(need) > self.num_free_blocks - reusable:
            return False
        if self.free_seq_slots is not None:
            missing = [t for t in req.tracks if t.seq_slot < 0]
            if len(missing) > len(self.free_seq_slots):
                return False
            for t in missing:
                t.seq_slot = self.free_seq_slots.pop()
        # NOTE: every track's hits are taken out of the free list before any new block is
        # popped from it: a hit of one track must not be handed to another as a fresh block.
        for track, h in zip(req.tracks, hits):
            for b in h:
                if self.ref_count[b] == 0:
                    del self.free[b]
                self.ref_count[b] += 1
            track.block_ids.extend(h)
        for track, n in zip(req.tracks, need):
            track.block_ids.extend(self._pop_free() for _ in range(n))
        if n_hit:
            req.num_computed_tokens = n_hit * self.block_size
            # a re-admitted (preempted) request can hit blocks of its own outputs
            req.num_cached_tokens = min(req.num_computed_tokens, req.num_prompt_tokens)
        return True

    def _pop_free(self) -> int:
        b, _ = self.free.popitem(last=False)
        if self.prefix is not None:  # evict it from the prefix cache
            self.prefix.forget(b)
        self.ref_count[b] = 1
        return b

    def free_request(self, req: Request) -> None:
        # tail blocks first (track 0's first), so a prompt's head (the most shareable
        # part) is evicted last
        for b in reversed([b for t in reversed(req.tracks) for b in t.block_ids]):
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                self.free[b] = None
        for t in req.tracks:
            t.block_ids = []
            if self.free_seq_slots is not None and t.seq_slot >= 0:
                self.free_seq_slots.append(t.seq_slot)
                t.seq_slot = -1

    # ------------------------------------------------------------ prefix cache
    def match_prefix(self, req: Request) -> list[list[int]]:
        """Cached blocks covering the head of req's tokens, per track, as many as every
        track finds in its own namespace (they share num_computed_tokens); [] for none.
        No side effects."""
        # NOTE: at least one token must still be computed (its logits give the next
        # token), so the block holding the last token is never taken from the cache.
        # NOTE: prompt logprobs need every prompt position computed, so no cache hits.
        if self.prefix is None or req.tracks[0].block_ids or req.params.prompt_logprobs is not None:
            return []
        n = (req.num_tokens - 1) // self.block_size
        hits = []
        for track in req.tracks:
            hits.append(self.prefix.lookup(track, req.token_ids, n))
            n = len(hits[-1])
        return [h[:n] for h in hits] if n else []

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's blocks that are full of computed KV (call after a step)."""
        if self.prefix is not None:
            for track in req.tracks:
                self.prefix.register(track, req.token_ids, req.num_computed_tokens)
