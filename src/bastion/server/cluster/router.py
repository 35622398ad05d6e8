"""`AffinityRouter`: Ray Serve's request router for the Bastion deployment (plugged in
through `RequestRouterConfig(request_router_class=...)`; it runs inside every
DeploymentHandle of the deployment, i.e. in the front's process).

Ray calls `choose_replicas(candidates, pending_request)` and gets back *ranks* of replicas:
it takes the least loaded replica of the first rank that has room (queue length below
`max_ongoing_requests`, from its cache or a probe), else tries the next rank, else backs
off and asks again. The front passes what the router needs as keyword arguments of the
call (`pending_request.kwargs`), so nothing here parses HTTP:

* `route_key` (affinity.py): rank 1 is the key's rendezvous replica, unless it is
  *overloaded* — it holds `slack` or more requests more than the least loaded replica —
  then the request goes to the less loaded of two random replicas (power of two choices),
  which is also rank 2 behind a preferred replica that is full. Under a flood of one
  prefix the spill stops at `slack` requests of imbalance, so that prefix ends up warm on
  a second replica instead of queueing behind one.
* `avoid`: replica ids this request already failed on (the front retries elsewhere);
  ignored when nothing else is left.
* `replica`: exactly this replica (the front's fan-out of /health, /metrics and adapter
  loads). If it is gone, any replica takes the call and answers that it is not it.

NOTE: Ray pickles this module by value into each handle, so it keeps no module state.

Load is this process's own count of requests in flight per replica (sent, not completed),
or Ray's cached queue length when that is higher (other fronts' work). Every router also
publishes the live replica ids (replica_set.py), which is how the front knows whom to
fan out to without asking the controller.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from bastion.server.cluster import replica_set
from bastion.server.cluster.affinity import rendezvous

DEFAULT_SLACK = 4  # requests of imbalance before a key's replica counts as overloaded
_IDLE_S = 0.005


class AffinityRouter(RequestRouter):
    def initialize_state(self, deployment: str = "", slack: int = DEFAULT_SLACK, **_: object) -> None:
        self._deployment = deployment  # the name live_replicas() publishes under
        self._slack = max(1, int(slack))
        self._in_flight: Counter[ReplicaID] = Counter()

    # ------------------------------------------------------------ choosing
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is None:  # see "stranded requests" below
            self._requeue_stranded()
            await asyncio.sleep(_IDLE_S)
            return [self._two_choices(candidate_replicas)]
        # every rank failing (all full, or probes unanswered) means: back off, then ask again
        pending_request.routing_context.should_backoff = True
        kwargs = pending_request.kwargs
        pinned = kwargs.get("replica")
        if pinned:
            match = [r for r in candidate_replicas if r.replica_id.unique_id == pinned]
            return [match or candidate_replicas]
        avoid = set(kwargs.get("avoid") or ())
        pool = [r for r in candidate_replicas if r.replica_id.unique_id not in avoid] or candidate_replicas
        two = self._two_choices(pool)
        key = kwargs.get("route_key")
        if not key or len(pool) == 1:
            return [two]
        by_id = {r.replica_id.unique_id: r for r in pool}
        preferred = by_id[rendezvous(key, by_id)]
        if self.load(preferred) >= min(self.load(r) for r in pool) + self._slack:
            return [two]
        return [[preferred], two]

    # ------------------------------------------------------------ stranded requests
    # Ray 2.55's routing tasks each pop a request to route, but a task that finds itself
    # one too many exits *after* popping, and under RequestRouter's exact matching the
    # request it held is then routed by no one; the remaining tasks ask with
    # pending_request=None, and what they choose is given to no one. (FIFOMixin would give
    # it to the oldest request: wrong for a pinned or keyed one.) So a task asked for none
    # puts every waiting request that is out of the routing queue back in it (one a task
    # is still routing gets routed twice; the first answer wins), then pauses a moment
    # before answering: a task that never awaits here spins the router's event loop.
    def _requeue_stranded(self) -> None:
        queued = {id(pr) for pr in self._pending_requests_to_route}
        for pr in list(self._pending_requests_to_fulfill):
            if not pr.future.done() and id(pr) not in queued:
                self._pending_requests_to_route.append(pr)

    @staticmethod
    def _two_choices(pool: list[RunningReplica]) -> list[RunningReplica]:
        return random.sample(pool, 2) if len(pool) > 2 else list(pool)

    def load(self, replica: RunningReplica) -> int:
        cached = self.replica_queue_len_cache.get(replica.replica_id) or 0
        return max(self._in_flight[replica.replica_id], cached)

    # ------------------------------------------------------------ bookkeeping
    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)
        self._in_flight[replica_id] += 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        if self._in_flight[replica_id] > 0:
            self._in_flight[replica_id] -= 1

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        for gone in [r for r in self._in_flight if r not in live]:
            del self._in_flight[gone]
        self._publish()

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._publish()

    def _publish(self) -> None:
        replica_set.publish(self._deployment, tuple(sorted(r.unique_id for r in self.curr_replicas)))
