"""BlockManager: allocation and freeing, ref counts, prefix sharing, eviction order, the
last-token rule, and salted namespaces. No model: Requests are driven by hand."""

from __future__ import annotations

import pytest

from bastion.engine.kv_cache.block_manager import BlockManager
from bastion.engine.request import Request, Track
from bastion.engine.sampling_params import SamplingParams

from tests.support.engines import assert_pool_clean

BS = 16


def req(tokens, rid="r", salt=""):
    return Request(rid, list(tokens), SamplingParams(max_tokens=8), tracks=[Track(cache_salt=salt)])


def hits_of(bm: BlockManager, r: Request) -> list[int]:
    """The prefix-cache hits of r's (only) track."""
    hits = bm.match_prefix(r)
    return hits[0] if hits else []


def compute(bm: BlockManager, r: Request, n: int | None = None, hits=None) -> None:
    """Allocate and 'compute' n more tokens (default: all), as the engine does after a step."""
    n = r.num_tokens - max(r.num_computed_tokens, len(hits or []) * BS) if n is None else n
    assert bm.allocate(r, n, [hits] if hits else None)
    r.num_computed_tokens += n
    bm.cache_full_blocks(r)


def test_allocate_and_free_counts():
    bm = BlockManager(8, BS)
    r = req(range(40))
    assert bm.blocks_needed(40) == 3 and bm.blocks_needed(48) == 3 and bm.blocks_needed(49) == 4
    assert bm.allocate(r, 40)
    assert len(r.tracks[0].block_ids) == 3 and len(set(r.tracks[0].block_ids)) == 3
    assert bm.num_used_blocks == 3 and bm.num_free_blocks == 5
    assert all(bm.ref_count[b] == 1 for b in r.tracks[0].block_ids)
    # growing inside the last block needs no new block; crossing a boundary needs one
    r.num_computed_tokens = 40
    assert bm.allocate(r, 8) and len(r.tracks[0].block_ids) == 3
    assert bm.allocate(r, 9) and len(r.tracks[0].block_ids) == 4
    bm.free_request(r)
    assert r.tracks[0].block_ids == []
    assert_pool_clean(bm)


def test_allocate_fails_without_side_effects():
    bm = BlockManager(4, BS)
    a, b = req(range(48), "a"), req(range(100, 140), "b")
    assert bm.allocate(a, 48)
    before = (list(bm.ref_count), list(bm.free), list(b.tracks[0].block_ids))
    assert not bm.allocate(b, 40)  # needs 3, 1 free
    assert (list(bm.ref_count), list(bm.free), list(b.tracks[0].block_ids)) == before
    assert bm.allocate(b, 16) and len(b.tracks[0].block_ids) == 1 and bm.num_free_blocks == 0
    assert not bm.allocate(b, 17)


def test_prefix_sharing_48_token_prefix():
    bm = BlockManager(16, BS)
    prefix = list(range(1000, 1048))  # 48 tokens = 3 full blocks
    a = req(prefix + [1, 2, 3, 4, 5], "a")
    compute(bm, a)
    assert a.num_cached_tokens == 0
    b = req(prefix + [7, 8], "b")
    hits = hits_of(bm, b)
    assert hits == a.tracks[0].block_ids[:3]
    compute(bm, b, hits=hits)
    assert b.num_cached_tokens == 48 and b.num_computed_tokens == 50
    assert b.tracks[0].block_ids[:3] == a.tracks[0].block_ids[:3] and b.tracks[0].block_ids[3] != a.tracks[0].block_ids[3]
    assert [bm.ref_count[x] for x in a.tracks[0].block_ids[:3]] == [2, 2, 2]
    assert bm.ref_count[a.tracks[0].block_ids[3]] == 1 and bm.ref_count[b.tracks[0].block_ids[3]] == 1
    assert bm.num_used_blocks == 5  # 3 shared + one tail each
    bm.free_request(a)
    assert [bm.ref_count[x] for x in b.tracks[0].block_ids[:3]] == [1, 1, 1]
    assert bm.num_used_blocks == 4
    bm.free_request(b)
    assert_pool_clean(bm)
    # freed blocks keep their content: a third request still hits all three
    c = req(prefix + [9], "c")
    assert len(hits_of(bm, c)) == 3


def test_only_full_computed_blocks_are_shared():
    bm = BlockManager(16, BS)
    a = req(range(40), "a")
    compute(bm, a, 20)  # one full block computed, the second half-written
    assert len(hits_of(bm, req(range(40), "b"))) == 1
    compute(bm, a, 20)
    assert len(hits_of(bm, req(range(40), "c"))) == 2  # 40 tokens: 2 full blocks
    # a diverging token in block 1 stops the match after block 0 (chain hash)
    t = list(range(40))
    t[20] = 999
    assert len(hits_of(bm, req(t, "d"))) == 1
    t = list(range(40))
    t[3] = 999
    assert hits_of(bm, req(t, "e")) == []


def test_last_token_block_never_taken_from_cache():
    bm = BlockManager(16, BS)
    a = req(range(32), "a")  # exactly two full blocks
    compute(bm, a)
    assert len(bm.prefix.hash_to_block) == 2
    b = req(range(32), "b")
    hits = hits_of(bm, b)
    assert len(hits) == 1  # the block holding token 31 is recomputed (its logits are needed)
    compute(bm, b, hits=hits)
    assert b.num_cached_tokens == 16 and b.num_computed_tokens == 32
    assert hits_of(bm, req(range(33), "c")) == a.tracks[0].block_ids[:2]  # one more token: both


def test_match_prefix_has_no_side_effects_and_needs_fresh_request():
    bm = BlockManager(8, BS)
    a = req(range(40), "a")
    compute(bm, a)
    bm.free_request(a)
    free_before, refs_before = list(bm.free), list(bm.ref_count)
    b = req(range(40), "b")
    assert len(hits_of(bm, b)) == 2
    assert list(bm.free) == free_before and bm.ref_count == refs_before
    assert b.tracks[0].block_ids == [] and b.num_computed_tokens == 0
    compute(bm, b, hits=hits_of(bm, b))
    assert hits_of(bm, b) == []  # already owns blocks


def test_hits_from_free_list_count_against_capacity():
    """Cached-but-free blocks that a request re-takes are no longer free for its new blocks."""
    bm = BlockManager(3, BS)
    a = req(range(33), "a")
    compute(bm, a)  # 3 blocks, 2 full ones cached
    bm.free_request(a)
    b = req(list(range(32)) + [500] * 20, "b")  # 52 tokens: 4 blocks > pool
    hits = hits_of(bm, b)
    assert len(hits) == 2
    assert not bm.allocate(b, 20, [hits])  # 2 hits + 2 new > 3
    assert_pool_clean(bm)
    assert bm.allocate(b, 16, [hits])  # 2 hits + 1 new == 3
    assert bm.num_free_blocks == 0 and b.num_computed_tokens == 32


def test_eviction_order_lru_and_tail_first():
    bm = BlockManager(6, BS)
    a = req(range(48), "a")
    compute(bm, a)  # blocks 0,1,2 (fresh blocks are handed out in index order)
    assert a.tracks[0].block_ids == [0, 1, 2]
    bm.free_request(a)
    # never-used blocks go first, then a's blocks tail first (the head is most shareable)
    b = req(range(500, 500 + 80), "b")
    assert bm.allocate(b, 48)
    assert b.tracks[0].block_ids == [3, 4, 5]
    assert len(hits_of(bm, req(list(range(48)) + [1], "x"))) == 3  # nothing evicted yet
    b.num_computed_tokens = 48
    assert bm.allocate(b, 16)
    assert b.tracks[0].block_ids[-1] == 2  # a's tail evicted first
    assert len(hits_of(bm, req(list(range(48)) + [1], "x"))) == 2
    assert bm.prefix.block_hash[2] is None
    b.num_computed_tokens = 64
    assert bm.allocate(b, 16)
    assert b.tracks[0].block_ids[-1] == 1
    assert len(hits_of(bm, req(list(range(48)) + [1], "x"))) == 1


def test_reused_cached_block_moves_to_back_of_eviction_queue():
    bm = BlockManager(4, BS)
    a, c = req(range(17), "a"), req(range(100, 117), "c")
    compute(bm, a)  # blocks 0 (cached), 1
    compute(bm, c)  # blocks 2 (cached), 3
    bm.free_request(a)
    bm.free_request(c)
    # a's head block is taken again from the cache and freed last: now the newest
    a2 = req(range(17), "a2")
    compute(bm, a2, hits=hits_of(bm, a2))
    assert a2.tracks[0].block_ids[0] == 0
    bm.free_request(a2)
    # fill the pool from scratch: block 0 must be evicted last
    d = req(range(900, 964), "d")
    assert bm.allocate(d, 48)
    assert 0 not in d.tracks[0].block_ids
    assert bm.prefix.block_hash[0] is not None
    assert len(hits_of(bm, req(range(17), "a3"))) == 1


def test_hash_salt_separates_namespaces():
    bm = BlockManager(16, BS)
    a = req(range(40), "a", salt="adapter-1")
    compute(bm, a)
    assert hits_of(bm, req(range(40), "b", salt="adapter-2")) == []
    assert hits_of(bm, req(range(40), "b2")) == []  # no salt is its own namespace
    assert len(hits_of(bm, req(range(40), "c", salt="adapter-1"))) == 2


def test_chain_hash_is_not_a_per_block_hash():
    """Same block content after different prefixes must not match (KV depends on the prefix)."""
    bm = BlockManager(16, BS)
    a = req(list(range(16)) + list(range(100, 116)) + [0], "a")
    compute(bm, a)
    b = req(list(range(16, 32)) + list(range(100, 116)) + [0], "b")
    assert hits_of(bm, b) == []


def test_prefix_caching_disabled():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = req(range(40), "a")
    compute(bm, a)
    assert bm.prefix is None and not bm.prefix_caching
    assert hits_of(bm, req(range(40), "b")) == []


def test_shared_block_not_reused_while_referenced():
    bm = BlockManager(5, BS)
    a = req(range(33), "a")
    compute(bm, a)  # 3 blocks
    b = req(range(33), "b")
    compute(bm, b, hits=hits_of(bm, b))  # shares 2, owns 1
    assert bm.num_used_blocks == 4
    bm.free_request(a)  # shared blocks still held by b
    c = req(range(700, 764), "c")
    assert not bm.allocate(c, 64)  # only 2 free (a's tail + one never-used)
    assert bm.allocate(c, 32)
    assert not set(c.tracks[0].block_ids) & set(b.tracks[0].block_ids)
    bm.free_request(b)
    bm.free_request(c)
    assert_pool_clean(bm)


@pytest.mark.parametrize("salt", ["", "x"])
def test_chain_hashes_memoised_on_request(salt):
    bm = BlockManager(8, BS)
    a = req(range(64), "a", salt)
    compute(bm, a, 20)
    assert len(a.tracks[0].block_hashes) == 1
    compute(bm, a, 44)
    assert len(a.tracks[0].block_hashes) == 4
    fresh = req(range(64), "f", salt)
    assert bm.prefix.chain_hashes(fresh.tracks[0], fresh.token_ids, 4) == a.tracks[0].block_hashes


def test_a_tracks_hit_is_never_handed_to_another_track_as_a_fresh_block():
    """Two tracks with prefix hits in the free list, the base's hit at its head: every hit
    is taken before any fresh block is popped, so no block is both one track's hit and
    another's new block."""
    bm = BlockManager(4, BS)

    def run(rid, tokens, salt):
        r = Request(rid, list(tokens), SamplingParams(max_tokens=8), tracks=[Track(cache_salt=salt)])
        compute(bm, r)
        bm.cache_full_blocks(r)
        return r

    base, adapter = run("base", range(16), "base"), run("adapter", range(16), "adapter")  # blocks 0, 1
    bm.free_request(base)
    bm.free_request(adapter)
    bm.free_request(run("other", range(100, 132), "z"))  # uses up blocks 2, 3: the free list is now [0, 1, 3, 2]
    assert list(bm.free)[0] == 0  # the base's cached block heads the free list
    c = Request("c", list(range(20)), SamplingParams(max_tokens=8),
                tracks=[Track(cache_salt="adapter"), Track(cache_salt="base")])
    hits = bm.match_prefix(c)
    assert hits == [[1], [0]]
    assert bm.allocate(c, 4, hits)
    owned = [b for t in c.tracks for b in t.block_ids]
    assert sorted(owned) == [0, 1, 2, 3], [t.block_ids for t in c.tracks]
    assert all(bm.ref_count[b] == 1 for b in owned) and bm.num_free_blocks == 0
    bm.free_request(c)
    assert_pool_clean(bm)
