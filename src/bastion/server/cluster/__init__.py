"""Bastion past one machine: N engines as one Ray Serve deployment behind one front.

    client --HTTP--> front (front.py: uvicorn in `bastion serve`, on --host/--port)
                       |  DeploymentHandle.serve_http, routed by AffinityRouter (router.py)
                       v
                     BastionReplica x N (replica.py: engine + the same FastAPI app)

Why this shape. Ray Serve's own HTTP proxy hands a replica the raw ASGI request, so a
router behind it sees no prompt; Ray's `PrefixCacheAffinityRouter` works on vLLM-shaped
request objects and lives in ray.llm (the `ray[llm]` extra pins vLLM and CUDA). So the
front reads the body itself, computes the affinity key (affinity.py: model/adapter +
first 512 characters of the prompt) and calls the deployment through its handle with
the key as a keyword argument; our router class, plugged in with `RequestRouterConfig`,
maps it to a replica by rendezvous hashing and falls back to the less loaded of two
random replicas when that one is overloaded. Ray keeps what it is good at: placing
replicas on nodes, health checks and restarts, autoscaling from the handle's queue
depth, rejecting work beyond a replica's capacity. Owning the front is also what makes
retries safe: it knows whether the client has seen a byte (front.py).

Entry point: `run_cluster(config, gate_factory)` (launch.py); `ray` is imported only
there, so the rest of Bastion runs without the 'cluster' extra.
"""

from __future__ import annotations

from typing import Any


def run_cluster(config: Any, gate_factory: Any = None) -> int:
    from bastion.server.cluster.launch import run_cluster as run

    return run(config, gate_factory)
