"""The live replica ids each router publishes, for the front's fan-outs (/health,
/metrics, adapter loads). A module of its own because Ray pickles the router's module *by
value* into every handle (RequestRouterConfig): state kept there would be a copy per
handle; this module is imported by reference, so router and front share it."""

from __future__ import annotations

import threading

_lock = threading.Lock()  # written on Ray's router loop thread, read on the front's
_live: dict[str, tuple[str, ...]] = {}  # deployment name -> live replica ids (unique_id)


def publish(deployment: str, ids: tuple[str, ...]) -> None:
    with _lock:
        _live[deployment] = ids


def live_replicas(deployment: str) -> tuple[str, ...]:
    """The replica ids the router of `deployment` in this process currently routes to
    (empty until the first call through a handle created the router)."""
    with _lock:
        return _live.get(deployment, ())
