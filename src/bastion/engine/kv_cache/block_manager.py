"""Block manager: which KV blocks each request owns, ref counts, and the prefix cache.

Full blocks are content-addressed by a chain hash of every token up to and including
the block (plus a salt, e.g. the adapter name), so requests with a shared prompt prefix
share physical blocks. A freed block keeps its hash and stays reusable until it is
evicted (least recently freed first).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from bastion.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_seq_slots: int | None = None, blocks_for=None):
        self.num_blocks, self.block_size = num_blocks, block_size
        # tokens -> blocks a sequence must own (KIVI: only groups that left the fp window)
        self.blocks_for = blocks_for or self.blocks_needed
        # NOTE: caches with per-sequence state (KIVI's fp window) have a fixed number of
        # sequence slots; a request holds one exactly while it holds blocks.
        self.free_seq_slots = None if num_seq_slots is None else list(range(num_seq_slots - 1, -1, -1))
        self.prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        # NOTE: free blocks in eviction order (oldest first); cached ones keep their hash.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))

    # ------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------ allocation
    def allocate(self, req: Request, num_new_tokens: int, prefix_hits: list[int] | None = None) -> bool:
        """Make sure `req` owns blocks for num_computed + num_new tokens. `prefix_hits`
        (from `match_prefix`, first allocation only) are shared cached blocks that cover
        the head of the prompt; taking them advances num_computed_tokens (for a request
        with a reference track, the track's own base-model hits of the same length too).
        Returns False, changing nothing, if the pool cannot hold it."""
        hits = prefix_hits or []
        ref_hits = self._hits(req, len(hits), ref=True) if hits and req.token_filter else []
        target = max(req.num_computed_tokens, len(hits) * self.block_size) + num_new_tokens
        need = self.blocks_for(target) - len(req.block_ids) - len(hits)
        # a request with a reference track (token filter) needs the same blocks twice
        ref_need = max(self.blocks_for(target) - len(req.ref_block_ids) - len(ref_hits), 0) if req.token_filter else 0
        # hits that sit in the free list (counted once: both tracks may share a block)
        reusable = len({b for b in hits + ref_hits if self.ref_count[b] == 0})
        if max(need, 0) + ref_need > self.num_free_blocks - reusable:
            return False
        if self.free_seq_slots is not None and req.seq_slot < 0:
            if not self.free_seq_slots:
                return False
            req.seq_slot = self.free_seq_slots.pop()
        for b in hits + ref_hits:
            if self.ref_count[b] == 0:
                del self.free[b]
            self.ref_count[b] += 1
        req.block_ids.extend(hits)
        req.ref_block_ids.extend(ref_hits)
        for _ in range(max(need, 0)):
            req.block_ids.append(self._pop_free())
        for _ in range(ref_need):
            req.ref_block_ids.append(self._pop_free())
        if hits:
            req.num_computed_tokens = len(hits) * self.block_size
            # a re-admitted (preempted) request can hit blocks of its own outputs
            req.num_cached_tokens = min(req.num_computed_tokens, req.num_prompt_tokens)
        return True

    def _pop_free(self) -> int:
        b, _ = self.free.popitem(last=False)
        h = self.block_hash[b]
        if h is not None:  # evict it from the prefix cache
            if self.hash_to_block.get(h) == b:
                del self.hash_to_block[h]
            self.block_hash[b] = None
        self.ref_count[b] = 1
        return b

    def free_request(self, req: Request) -> None:
        # tail blocks first, so a prompt's head (the most shareable part) is evicted last
        for b in reversed(req.ref_block_ids + req.block_ids):
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                self.free[b] = None
        req.block_ids, req.ref_block_ids = [], []
        if self.free_seq_slots is not None and req.seq_slot >= 0:
            self.free_seq_slots.append(req.seq_slot)
            req.seq_slot = -1

    # ------------------------------------------------------------ prefix cache
    def _chain_hashes(self, req: Request, num_full_blocks: int, ref: bool = False) -> list[bytes]:
        # NOTE: a full block's tokens never change (recompute keeps them), so the chain
        # is extended incrementally and memoised on the request. The reference track
        # (base model, no adapter) has its own chain under the base's salt.
        hashes, salt = (req.ref_block_hashes, req.ref_cache_salt) if ref else (req.block_hashes, req.cache_salt)
        bs = self.block_size
        # blake2b, not hash(): a crafted prompt must not collide with another user's
        # prefix (that would serve it someone else's KV).
        h = hashes[-1] if hashes else hashlib.blake2b(salt.encode(), digest_size=16).digest()
        for i in range(len(hashes), num_full_blocks):
            block = array("q", req.token_ids[i * bs : (i + 1) * bs]).tobytes()
            h = hashlib.blake2b(h + block, digest_size=16).digest()
            hashes.append(h)
        return hashes[:num_full_blocks]

    def _hits(self, req: Request, max_blocks: int, ref: bool = False) -> list[int]:
        hits = []
        for h in self._chain_hashes(req, max_blocks, ref):
            b = self.hash_to_block.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def match_prefix(self, req: Request) -> list[int]:
        """Cached blocks covering the head of req's tokens (no side effects). For a request
        with a reference track, only as many as the track finds under the base's salt too
        (both tracks share num_computed_tokens); `allocate` takes the track's own hits."""
        # NOTE: at least one token must still be computed (its logits give the next
        # token), so the block holding the last token is never taken from the cache.
        # NOTE: prompt logprobs need every prompt position computed, so no cache hits.
        if not self.prefix_caching or req.block_ids or req.params.prompt_logprobs is not None:
            return []
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits = self._hits(req, max_blocks)
        if req.token_filter is not None and hits:
            hits = hits[: len(self._hits(req, len(hits), ref=True))]
        return hits

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's blocks that are full of computed KV (call after a step)."""
        if not self.prefix_caching:
            return
        tracks = ((req.block_ids, False), (req.ref_block_ids, True)) if req.token_filter else ((req.block_ids, False),)
        for blocks, ref in tracks:
            n_full = min(req.num_computed_tokens // self.block_size, len(blocks))
            for i, h in enumerate(self._chain_hashes(req, n_full, ref)):
                b = blocks[i]
                if self.block_hash[b] is None and h not in self.hash_to_block:
                    self.block_hash[b] = h
                    self.hash_to_block[h] = b
