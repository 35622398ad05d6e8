"""A model-free engine loop for scheduler tests (tests/engine/test_scheduler*.py).

`FakeLoop` plays the engine: it writes each computed token into a fake KV pool (slot ->
(position, token)), checks before every step that each scheduled request's context is
intact in the blocks it owns (so a block shared, evicted or reused wrongly is caught),
and "samples" a next token that is a pure function of the sequence so far, so any run
of the same request must produce the same output whatever the scheduling."""

from __future__ import annotations

from bastion.config import SchedulerConfig
from bastion.engine.kv_cache.block_manager import BlockManager
from bastion.engine.request import Request, Scheduling, Status, Track
from bastion.engine.sampling_params import SamplingParams
from bastion.engine.scheduler import Scheduler

V = 1000


def next_token(tokens: list[int]) -> int:
    h = 7
    for t in tokens[-8:]:
        h = (h * 1_000_003 + t) % 2**61
    return (h + len(tokens)) % V


class FakeLoop:
    def __init__(self, num_blocks, block_size=4, budget=32, max_num_seqs=8, prefix_caching=True, policy="fcfs"):
        self.bm = BlockManager(num_blocks, block_size, prefix_caching)
        self.sched = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                               policy=policy), self.bm)
        self.budget, self.bs = budget, block_size
        self.kv: dict[int, tuple[int, int]] = {}  # slot -> (position, token)
        self.batches: list[list[tuple[str, int, int]]] = []  # (rid, computed before, n)
        self.finished: dict[str, Request] = {}

    def add(self, rid, prompt, max_tokens=8, stop_ids=(), salt="", priority=0, tenant="", weight=1.0):
        r = Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, stop_token_ids=tuple(stop_ids)),
                    tracks=[Track(cache_salt=salt)], scheduling=Scheduling(priority, tenant, weight))
        self.sched.add(r)
        return r

    def slot(self, r, pos):
        return r.tracks[0].block_ids[pos // self.bs] * self.bs + pos % self.bs

    def step(self):
        batch = self.sched.schedule()
        self.batches.append([(r.request_id, r.num_computed_tokens, n) for r, n in batch.items])
        assert batch.num_tokens <= self.budget
        assert len(self.sched.running) <= self.sched.config.max_num_seqs
        assert len({r.request_id for r, _ in batch.items}) == len(batch.items)
        for r, n in batch.items:
            assert n >= 1 and r.status is Status.RUNNING
            c = r.num_computed_tokens
            assert c + n <= r.num_tokens
            assert len(r.tracks[0].block_ids) >= self.bm.blocks_needed(c + n)
            for p in range(c):  # the context this step attends to is intact
                assert self.kv.get(self.slot(r, p)) == (p, r.token_ids[p]), (r.request_id, p)
        self.check_refcounts()
        for r, n in batch.items:
            c = r.num_computed_tokens
            for p in range(c, c + n):
                self.kv[self.slot(r, p)] = (p, r.token_ids[p])
            r.num_computed_tokens += n
            self.bm.cache_full_blocks(r)
        for r, n in batch.items:
            if r.num_computed_tokens == r.num_tokens:
                tok = next_token(r.token_ids)
                r.token_ids.append(tok)
                if tok in r.params.stop_token_ids:
                    self.finish(r, "stop")
                elif r.num_output_tokens >= r.params.max_tokens:
                    self.finish(r, "length")
        return batch

    def finish(self, r, reason):
        self.sched.finish(r, reason)
        self.finished[r.request_id] = r

    def check_refcounts(self):
        owners = [0] * self.bm.num_blocks
        for r in self.sched.running:
            for b in r.tracks[0].block_ids:
                owners[b] += 1
        for r in self.sched.waiting:
            assert r.tracks[0].block_ids == [] and r.status is Status.WAITING  # waiting requests own nothing
        assert owners == self.bm.ref_count
        assert all((b in self.bm.free) == (owners[b] == 0) for b in range(self.bm.num_blocks))

    def run(self, max_steps=10_000):
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            assert self.step(), "no progress: nothing scheduled while requests are unfinished"
        raise AssertionError("did not finish")


def reference_output(prompt, max_tokens, stop_ids=()):
    toks = list(prompt)
    for _ in range(max_tokens):
        t = next_token(toks)
        toks.append(t)
        if t in stop_ids:
            break
    return toks[len(prompt):]
