"""Runtime adapter loads, replayed onto replicas that start later.

The front sends `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` to every
replica it knows (front.py). A replica that starts afterwards (autoscaling, Serve
replacing a dead one) begins with the `--lora` adapters only, so the front keeps the last
load request of each adapter every replica accepted (200 loaded or 202 pending), forgets
it when an unload succeeds everywhere, and replays the kept loads, in order, on each
replica id it sees for the first time. Until its replay is done a new replica answers
that adapter with 404 (or 409 while its own behaviour scan runs).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable

from bastion.server.cluster.messages import ForwardedRequest, Head

log = logging.getLogger("bastion.cluster")

Ask = Callable[[ForwardedRequest, str], Awaitable[tuple[Head | None, bytes]]]


class AdapterLog:
    def __init__(self) -> None:
        self._loads: dict[str, ForwardedRequest] = {}  # adapter name -> its load, in load order
        self._synced: set[str] = set()  # replica ids that have every kept load
        self._task: asyncio.Task | None = None

    def record(self, fwd: ForwardedRequest, replicas: Iterable[str], statuses: Iterable[int | None]) -> None:
        """A fan-out to `replicas` answered `statuses` (None: no answer)."""
        replicas, statuses = list(replicas), list(statuses)
        if not self._loads:
            self._synced |= set(replicas)  # they had nothing to catch up on
        try:
            name = json.loads(fwd.body).get("lora_name")
        except (ValueError, AttributeError):
            return
        if not isinstance(name, str):
            return
        if fwd.path.endswith("/load_lora_adapter") and all(s in (200, 202) for s in statuses):
            self._loads.pop(name, None)
            self._loads[name] = fwd
        elif fwd.path.endswith("/unload_lora_adapter") and all(s == 200 for s in statuses):
            self._loads.pop(name, None)

    def catch_up(self, replicas: Iterable[str], ask: Ask) -> None:
        """Replay the kept loads on replicas not seen before (in the background, one pass at a time)."""
        new = [r for r in replicas if r not in self._synced]
        if not new or (self._task is not None and not self._task.done()):
            return
        if not self._loads:
            self._synced |= set(new)
            return
        self._task = asyncio.ensure_future(self._replay(new, list(self._loads.values()), ask))

    async def _replay(self, replicas: list[str], loads: list[ForwardedRequest], ask: Ask) -> None:
        for replica in replicas:
            answers = [await ask(fwd, replica) for fwd in loads]
            if all(head is not None for head, _ in answers):
                self._synced.add(replica)
                log.info("replica %s: %d runtime adapter load(s) replayed", replica, len(loads))
            else:
                log.warning("replica %s did not answer the adapter replay; will try again", replica)
