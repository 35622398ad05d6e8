"""Who goes first: the order the scheduler admits, schedules and preempts requests in.

The scheduler asks a policy three things and tells it one:
* `rank(req)`: a sort key, smaller = more deserving. Running requests are served in this
  order each step (so the token budget goes to the most deserving first), the most
  deserving waiting request is admitted next, and under KV pressure the least deserving
  running request is preempted.
* `displaces(waiting, victim, running)`: may `waiting` preempt `victim` (the least
  deserving of the `running` requests) to be admitted now (memory or the running-request
  limit says no otherwise)?
* `prefill_alone_tenant(running, waiting)`: a tenant whose prefill this step should carry
  without other tenants' prefills (only their decodes), or None. The step then lasts
  about as long as that tenant's own prompt, not the step budget (fair mode).
* `charge(req, n)`: `n` tokens of `req` were scheduled (fair mode counts service).

fcfs: arrival order (what the scheduler did before policies existed).
priority: vLLM's per-request priority, lower first, ties by arrival; a waiting request
  preempts running ones of strictly lower priority (equal priorities never preempt each
  other, so a level is served first come, first served without churn).
fair: the Virtual Token Counter of "Fairness in Serving Large Language Models" (Sheng et
  al., OSDI 2024, arXiv 2401.00588). Each tenant has a counter of the service it received,
  in weighted tokens (prompt tokens 1, generated tokens 2, divided by the tenant's
  weight); the tenant with the smallest counter is served first. A tenant that comes
  back after being idle has its counter lifted to the smallest counter of the tenants
  still active, so idling does not bank credit it could later flood with.
  VTC only orders admission, so a quiet tenant still waits for a flood's running request
  to finish before it gets a slot. Here a tenant below its weighted share of the running
  requests may also preempt one of a tenant above its share (by recompute; the prefix
  cache usually keeps the victim's prompt), so its first token comes within a step or two.
  The rule is one-way (below share takes from above share), so two tenants never preempt
  each other back and forth. And a step that prefills a request of a tenant below its
  share carries only decodes of the other tenants, not their prefill chunks: the quiet
  tenant's first token then costs its own prompt plus a few decodes, not a full step
  budget of someone else's prompts (measured in docs/BENCHMARKS.md, fairness).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable

from bastion.engine.request import Request, Status

PROMPT_TOKEN_COST = 1.0  # VTC's w_p
OUTPUT_TOKEN_COST = 2.0  # VTC's w_q: a generated token costs a step of its own


class FcfsPolicy:
    name = "fcfs"

    def rank(self, req: Request) -> tuple:
        return (req.arrival,)

    def displaces(self, waiting: Request, victim: Request, running: list[Request]) -> bool:
        return False

    def on_add(self, req: Request) -> None:
        pass

    def prefill_alone_tenant(self, running: list[Request], waiting: Iterable[Request]) -> str | None:
        return None

    def charge(self, req: Request, n: int) -> None:
        pass

    def on_finish(self, req: Request) -> None:
        pass


class PriorityPolicy(FcfsPolicy):
    name = "priority"

    def rank(self, req: Request) -> tuple:
        return (req.scheduling.priority, req.arrival)

    def displaces(self, waiting: Request, victim: Request, running: list[Request]) -> bool:
        return victim.scheduling.priority > waiting.scheduling.priority


class FairPolicy(FcfsPolicy):
    name = "fair"

    def __init__(self) -> None:
        self.counters: dict[str, float] = {}  # tenant -> weighted tokens of service
        self._active: Counter[str] = Counter()  # tenant -> unfinished requests in the scheduler
        self._weights: dict[str, float] = {}  # tenant -> its weight (as its latest request said)

    def rank(self, req: Request) -> tuple:
        return (self.counters.get(req.scheduling.tenant, 0.0), req.arrival)

    def on_add(self, req: Request) -> None:
        tenant = req.scheduling.tenant
        if not self._active[tenant]:
            # back from idle: no credit for the time it sent nothing (VTC's counter lift)
            others = [self.counters.get(t, 0.0) for t, n in self._active.items() if n and t != tenant]
            if others:
                self.counters[tenant] = max(self.counters.get(tenant, 0.0), min(others))
        self._active[tenant] += 1
        self._weights[tenant] = req.scheduling.weight

    def displaces(self, waiting: Request, victim: Request, running: list[Request]) -> bool:
        mine, theirs = waiting.scheduling.tenant, victim.scheduling.tenant
        if mine == theirs:
            return False
        held = Counter(r.scheduling.tenant for r in running)
        total_weight = sum(self._weights[t] for t in self._active)
        share = {t: len(running) * self._weights[t] / total_weight for t in (mine, theirs)}
        return held[mine] + 1 <= share[mine] + 1e-9 and held[theirs] - 1 >= share[theirs] - 1e-9

    def prefill_alone_tenant(self, running: list[Request], waiting: Iterable[Request]) -> str | None:
        """Of each tenant's most deserving prefill (running or waiting), the first in rank
        order whose tenant is below its share."""
        if len(self._active) < 2:  # one tenant has all the share: skip the pass over the queue
            return None
        best: dict[str, Request] = {}
        for req in itertools.chain((r for r in running if prefilling(r)), waiting):
            tenant = req.scheduling.tenant
            if tenant not in best or self.rank(req) < self.rank(best[tenant]):
                best[tenant] = req
        for req in sorted(best.values(), key=self.rank):
            if self.prefills_alone(req, running):
                return req.scheduling.tenant
        return None

    def prefills_alone(self, req: Request, running: list[Request]) -> bool:
        """Below its weighted share of the running requests, counting `req` itself (so a
        tenant at its share, e.g. two equal tenants 8 + 8, never excludes the other)."""
        mine = req.scheduling.tenant
        joining = req.status is Status.WAITING  # (not `req in running`: a dataclass compares by fields)
        held = sum(r.scheduling.tenant == mine for r in running) + joining
        share = (len(running) + joining) * self._weights[mine] / sum(self._weights[t] for t in self._active)
        return held < share - 1e-9

    def charge(self, req: Request, n: int) -> None:
        # NOTE: tokens recomputed after a preemption are not service the tenant asked for:
        # only positions past the request's high-water mark are charged.
        start = max(req.num_computed_tokens, req.num_charged_tokens)
        end = req.num_computed_tokens + n
        if end <= start:
            return
        prompt = max(0, min(end, req.num_prompt_tokens) - start)
        cost = PROMPT_TOKEN_COST * prompt + OUTPUT_TOKEN_COST * (end - start - prompt)
        req.num_charged_tokens = end
        tenant = req.scheduling.tenant
        self.counters[tenant] = self.counters.get(tenant, 0.0) + cost / req.scheduling.weight

    def on_finish(self, req: Request) -> None:
        tenant = req.scheduling.tenant
        self._active[tenant] -= 1
        if self._active[tenant] <= 0:
            del self._active[tenant]


def prefilling(req: Request) -> bool:
    """More than the one next token to compute: a prompt (or a recompute) in progress."""
    return req.num_tokens - req.num_computed_tokens > 1


def make_policy(name: str) -> FcfsPolicy:
    """The policy object for SchedulerConfig.policy (validated there)."""
    return {"fcfs": FcfsPolicy, "priority": PriorityPolicy, "fair": FairPolicy}[name]()
