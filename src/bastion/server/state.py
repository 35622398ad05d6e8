"""Per-app server state, reached from handlers as `request.app.state.bastion`.

Everything a handler needs lives here rather than in module globals, so several apps
(with different engines, keys and registries) can coexist in one process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from bastion.config import ServerConfig
from bastion.server.errors import unavailable
from bastion.server.metrics import ServerMetrics
from bastion.server.served_models import ServedModels
from bastion.serving.policy import ServingPolicy

logger = logging.getLogger("bastion.server")


@dataclass
class ServerState:
    config: ServerConfig
    models: ServedModels
    metrics: ServerMetrics
    policy: ServingPolicy  # gate, CleanGen choice, output guards: fixed at start
    draining: bool = False  # set when shutdown begins: new requests get 503
    adapter_loads: Any = None  # adapter_loads.AdapterLoads: every adapter load and the vetting thread

    def ensure_serving(self) -> None:
        if self.draining:
            raise unavailable("The server is shutting down.")

    def log_private(self, msg: str, *args: object) -> None:
        """Log something that contains prompts or outputs: only with log_requests on."""
        if self.config.log_requests:
            logger.info(msg, *args)


def get_state(request: Request) -> ServerState:
    return request.app.state.bastion
