"""`run_cluster(config)`: what `bastion serve --replicas N` runs. Binds --host/--port first
(a taken port fails before Ray starts), joins the Ray cluster at --ray-address or starts a
local one, deploys `BastionReplica` with the affinity router, then serves the front with
uvicorn until SIGINT/SIGTERM and takes the deployment down again.

Resources: a replica asks Ray for `threads` CPUs and runs its engine with that many torch
threads. Without --threads: on a local cluster the machine's cores are divided between
the replicas; on a joined cluster each replica asks for 1 CPU and uses every core of its
node (place one replica per node then, or give --threads).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import replace
from typing import Any

from bastion.config import Config
from bastion.server.bind import bind_socket
from bastion.server.cluster.replica import BastionReplica, GateFactory

log = logging.getLogger("bastion.cluster")

APP = "bastion"
DEPLOYMENT = "BastionReplica"
PASSED_ENV_PREFIXES = ("BASTION_", "HF_")  # keys, offline switches, caches: the replicas need them too


class ClusterUnavailable(OSError):
    """Ray Serve is not installed (the 'cluster' extra)."""


def import_serve() -> Any:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry from a private server
    # Ray's router asks a replica for its queue length before sending it a request and
    # gives up after 0.1 s (doubling per retry): a replica busy on CPU-bound decode steps
    # (a small node, cores shared) misses that, and requests stall in backoff. Read at import.
    os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")
    os.environ.setdefault("RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "5.0")
    try:
        from ray import serve
    except ImportError:
        raise ClusterUnavailable("--replicas/--ray-address need Ray Serve: pip install 'bastion[cluster]'") from None
    return serve


def replica_threads(config: Config, local: bool) -> int | None:
    if config.model.threads:
        return config.model.threads
    if not local:
        return None
    return max(1, (os.cpu_count() or 1) // max_replicas(config))


def max_replicas(config: Config) -> int:
    c = config.cluster
    return c.max_replicas or c.replicas or 1


def deployment_options(config: Config, threads: int | None) -> dict[str, Any]:
    """serve.deployment options for `config` (fixed replicas or autoscaling bounds)."""
    from ray.serve.config import RequestRouterConfig

    from bastion.server.cluster.router import AffinityRouter

    c, s = config.cluster, config.scheduler
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        "ray_actor_options": {"num_cpus": threads or 1, "runtime_env": {"env_vars": _passed_env()}},
        # the engine queues and answers 429 itself: Serve only stops at its capacity (+ room
        # for the front's /health and /metrics calls)
        "max_ongoing_requests": capacity(config) + 8,
        "request_router_config": RequestRouterConfig(request_router_class=AffinityRouter,
                                                     request_router_kwargs={"deployment": DEPLOYMENT}),
        "health_check_period_s": 5.0,
        "health_check_timeout_s": max(30.0, config.server.engine_stall_s / 2),
        "graceful_shutdown_timeout_s": config.server.shutdown_grace_s,
        "logging_config": {"log_level": "WARNING", "enable_access_log": False},  # no prompt ever in a log
    }
    if c.min_replicas is not None:
        # queue depth: scale out when replicas hold more than a full batch each on average
        options["autoscaling_config"] = {"min_replicas": c.min_replicas, "max_replicas": c.max_replicas,
                                         "initial_replicas": c.replicas or c.min_replicas,
                                         "target_ongoing_requests": s.max_num_seqs}
    else:
        options["num_replicas"] = c.replicas or 1
    return options


def capacity(config: Config) -> int:
    """Requests one replica holds before its engine answers 429: a batch and its queue."""
    return config.scheduler.max_num_seqs + config.scheduler.max_waiting


def _passed_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV_PREFIXES)}


def start_ray(config: Config, threads: int | None) -> bool:
    """Join --ray-address or start a local Ray; True if this process started it."""
    import ray

    if config.cluster.ray_address:
        ray.init(address=config.cluster.ray_address, namespace=APP, logging_level=logging.WARNING,
                 log_to_driver=True)
        return False
    ray.init(num_cpus=max_replicas(config) * (threads or 1), include_dashboard=False, namespace=APP,
             object_store_memory=256 * 2**20, logging_level=logging.WARNING, log_to_driver=True)
    return True


def deploy(config: Config, gate_factory: GateFactory | None = None, threads: int | None = None) -> Any:
    """Deploy the replicas (blocks until they all run); the handle the front calls."""
    serve = import_serve()
    serve.start(proxy_location="Disabled")  # the front is our HTTP server; Serve's proxy stays off
    shipped = replace(config, model=replace(config.model, threads=threads))
    deployment = serve.deployment(BastionReplica, **deployment_options(config, threads))
    return serve.run(deployment.bind(shipped, gate_factory), name=APP, route_prefix=None)


def run_cluster(config: Config, gate_factory: GateFactory | None = None) -> int:
    serve = import_serve()
    import ray
    import uvicorn

    from bastion.server.auth import resolve_api_key
    from bastion.server.cluster.front import Front
    from bastion.server.tenants import Tenants

    sock = bind_socket(config.server.host, config.server.port)
    local = not config.cluster.ray_address
    threads = replica_threads(config, local)
    started = False
    try:
        started = start_ray(config, threads)
        n = config.cluster.replicas or config.cluster.min_replicas or 1
        print(f"bastion: starting {n} replica(s) on Ray Serve ({threads or 'all'} thread(s) each)", file=sys.stderr)
        handle = deploy(config, gate_factory, threads)
        front = Front(handle.options(method_name="serve_http", stream=True), DEPLOYMENT, capacity=capacity(config),
                      max_body_bytes=config.server.max_body_bytes,
                      tenants=Tenants(config.server, resolve_api_key(config.server.api_key)))
        port = sock.getsockname()[1]
        # NOTE: listen before saying "serving on": a client that reads the line and connects
        # at once waits in the backlog until uvicorn accepts, instead of being refused
        sock.listen(2048)
        print(f"bastion: serving on http://{config.server.host}:{port}/v1 through {n} replica(s)"
              + (" (API key required)" if config.server.api_key else ""), file=sys.stderr)
        server = uvicorn.Server(uvicorn.Config(front.app(), host=config.server.host, port=port, lifespan="off",
                                               access_log=True, timeout_graceful_shutdown=int(
                                                   config.server.shutdown_grace_s) + 5))
        server.run(sockets=[sock])
    finally:
        sock.close()
        _tear_down(serve, ray, started)
    return 0


def _tear_down(serve: Any, ray: Any, started: bool) -> None:
    """The HTTP server has drained its requests by now. A local Ray goes down whole with
    ray.shutdown() (Serve's own shutdown waits up to 30 s for its controller, for
    nothing); on a shared cluster only our application is deleted."""
    try:
        if ray.is_initialized() and not started:
            serve.delete(APP)
    except Exception:  # noqa: BLE001 - going down anyway; say why it was unclean
        log.exception("taking the Serve application down failed")
    finally:
        ray.shutdown()
