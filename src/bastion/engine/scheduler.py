"""Continuous-batching scheduler with a per-step token budget and chunked prefill.

It counts tokens, not phases: each request has `num_tokens` (prompt + outputs) and
`num_computed_tokens` (KV written). A step gives each running request what it still
needs (1 token for a decode, a chunk for a prompt) within the budget, then admits
waiting requests. KV memory is visible only through the block manager's answers;
when it says no, the least deserving running request is preempted by recompute (its
blocks are freed and it goes back to the queue with all its tokens kept).

Who is most deserving is the policy's call (scheduler_policy.py: fcfs, priority, fair):
running requests are served in its order, the best waiting request is admitted next,
and a waiting request the policy lets displace a running one preempts it when memory or
the running-request limit would otherwise keep it out.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from bastion.config import SchedulerConfig
from bastion.engine.kv_cache.block_manager import BlockManager
from bastion.engine.request import Request, Status
from bastion.engine.scheduler_policy import make_policy, prefilling


@dataclass
class ScheduledBatch:
    # (request, number of new tokens to compute this step), in batch order
    items: list[tuple[Request, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.policy = make_policy(config.policy)

    def add(self, req: Request) -> None:
        self.policy.on_add(req)
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        solo = next((r for r in self.running if r.isolated), None)
        if solo is not None or (self.waiting and self.waiting[0].isolated):
            return self._schedule_alone(solo or self.waiting[0])
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        preempted = False
        self.running.sort(key=self.policy.rank)  # fcfs: by arrival (a re-admitted request is old)
        alone = self.policy.prefill_alone_tenant(self.running, self.waiting)  # or None
        # 1) running requests, most deserving first; on memory pressure evict from the back
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if alone is not None and req.scheduling.tenant != alone and prefilling(req):
                i += 1  # its chunk waits a step: only other tenants' decodes share `alone`'s prefill
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.bm.allocate(req, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                batch.items.append((req, n))
                self.policy.charge(req, n)  # now: the admissions below see this step's service
                budget -= n
                i += 1
        # 2) admit waiting requests (not in a step that had to preempt: memory is tight)
        while self.waiting and budget > 0 and not preempted:
            req = self._best_waiting(alone)
            if req is None:
                break
            if len(self.running) >= self.config.max_num_seqs:
                freed = self._displace(req, batch)
                if freed < 0:
                    break
                budget += freed
            hits = self.bm.match_prefix(req)
            n = min(req.num_tokens - self._start(req, hits), budget)
            if not self.bm.allocate(req, n, hits):
                freed = self._displace(req, batch)
                if freed < 0:
                    break
                budget += freed
                continue
            self.waiting.remove(req)
            req.status = Status.RUNNING
            self.running.append(req)
            batch.items.append((req, n))
            self.policy.charge(req, n)
            budget -= n
        return batch

    def _best_waiting(self, tenant: str | None = None) -> Request | None:
        """The waiting request to admit next (of `tenant` only, when given)."""
        if tenant is None:
            return self.waiting[0] if self.policy.name == "fcfs" else min(self.waiting, key=self.policy.rank)
        return min((r for r in self.waiting if r.scheduling.tenant == tenant), key=self.policy.rank, default=None)

    def _displace(self, req: Request, batch: ScheduledBatch) -> int:
        """Preempt the least deserving running request if the policy lets `req` displace
        it; it leaves this step's batch (nothing has run yet). Returns the budget it gave
        back, -1 if nothing was displaced."""
        if not self.running or not self.policy.displaces(req, self.running[-1], self.running):
            return -1
        victim = self.running.pop()
        freed = 0
        for j, (r, n) in enumerate(batch.items):
            if r is victim:
                del batch.items[j]
                freed = n
                break
        self._preempt(victim)
        return freed

    def _schedule_alone(self, req: Request) -> ScheduledBatch:
        """One step of an isolated request and nothing else; others are preempted if it
        needs their memory (add_request guarantees it fits the empty pool)."""
        hits = self.bm.match_prefix(req) if req.status is Status.WAITING else []
        n = min(req.num_tokens - self._start(req, hits), self.config.max_num_batched_tokens)
        while not self.bm.allocate(req, n, hits):
            others = [r for r in self.running if r is not req]
            if not others:
                return ScheduledBatch()
            self.running.remove(others[-1])
            self._preempt(others[-1])
        if req.status is Status.WAITING:
            self.waiting.remove(req)
            req.status = Status.RUNNING
            self.running.append(req)
        return ScheduledBatch([(req, n)])

    def _start(self, req: Request, hits: list[list[int]]) -> int:
        """The first token this request computes, prefix-cache hits taken."""
        return max(req.num_computed_tokens, len(hits[0]) * self.bm.block_size if hits else 0)

    def isolate(self, reqs: list[Request]) -> None:
        """Roll `reqs` back (preemption by recompute, so no half-written state survives)
        and mark them to run alone, in their order, ahead of the queue."""
        for req in reversed(reqs):
            if req.status is Status.RUNNING:
                self.running.remove(req)
                self._preempt(req)
            req.isolated = True

    def _preempt(self, req: Request) -> None:
        self.bm.free_request(req)
        req.num_computed_tokens = 0
        req.num_cached_tokens = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request, reason: str) -> None:
        """Mark finished and free its blocks at once (stop, length, or abort/cancel)."""
        if req.finished:
            return
        if req.status is Status.RUNNING:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.bm.free_request(req)
        self.policy.on_finish(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
