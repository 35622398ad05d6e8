"""The prefix cache beside the block pool: full blocks content-addressed by a chain hash
of every token up to and including the block, plus the track's salt (e.g. the adapter and
tenant), so requests with a shared prompt prefix share physical blocks. A freed block
keeps its hash and stays findable until the pool hands it out again (`forget`)."""

from __future__ import annotations

import hashlib
from array import array

from bastion.engine.request import Track


class PrefixCache:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}

    def chain_hashes(self, track: Track, token_ids: list[int], num_full_blocks: int) -> list[bytes]:
        # NOTE: a full block's tokens never change (recompute keeps them), so the chain is
        # extended incrementally and memoised on the track.
        hashes, bs = track.block_hashes, self.block_size
        # blake2b, not hash(): a crafted prompt must not collide with another user's
        # prefix (that would serve it someone else's KV).
        h = hashes[-1] if hashes else hashlib.blake2b(track.cache_salt.encode(), digest_size=16).digest()
        for i in range(len(hashes), num_full_blocks):
            block = array("q", token_ids[i * bs : (i + 1) * bs]).tobytes()
            h = hashlib.blake2b(h + block, digest_size=16).digest()
            hashes.append(h)
        return hashes[:num_full_blocks]

    def lookup(self, track: Track, token_ids: list[int], max_blocks: int) -> list[int]:
        """Cached blocks holding the track's first blocks, up to max_blocks (no side effects)."""
        hits = []
        for h in self.chain_hashes(track, token_ids, max_blocks):
            b = self.hash_to_block.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def register(self, track: Track, token_ids: list[int], num_computed: int) -> None:
        """Make the track's blocks that are full of computed KV findable."""
        n_full = min(num_computed // self.block_size, len(track.block_ids))
        for i, h in enumerate(self.chain_hashes(track, token_ids, n_full)):
            b = track.block_ids[i]
            if self.block_hash[b] is None and h not in self.hash_to_block:
                self.block_hash[b] = h
                self.hash_to_block[h] = b

    def forget(self, block: int) -> None:
        """The block is being reused for other content."""
        h = self.block_hash[block]
        if h is not None:
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = None
