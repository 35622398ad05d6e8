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
from bastion.server.served_models import ServedModel, ServedModels
from bastion.server.tenants import Tenant, Tenants
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
    tenants: Tenants | None = None  # API keys as tenants: limits, adapter lists (server/tenants.py)

    def tenant(self, request: Request, user: str | None = None) -> Tenant:
        """Who `request` is served for (the auth middleware put its key's tenant in
        request.state; without keys, the `user` field or the anonymous tenant)."""
        keyed = getattr(request.state, "tenant", None)
        return self.tenants.for_request(keyed, user) if self.tenants else Tenants(self.config, None).anonymous

    @staticmethod
    def visible_to(tenant: Tenant):
        """The filter for ServedModels: what `tenant` may see and use."""
        return lambda model: Tenants.visible(tenant, model.adapter)

    def resolve_for(self, request: Request, model_id: str | None, user: str | None = None,
                    ) -> tuple[ServedModel, Tenant]:
        """The served model a request names, as its tenant sees the table (404 for a
        model it may not use, 409 for a pending adapter), and the tenant."""
        tenant = self.tenant(request, user)
        return self.models.resolve(model_id, self.visible_to(tenant)), tenant

    def ensure_serving(self) -> None:
        if self.draining:
            raise unavailable("The server is shutting down.")

    def log_private(self, msg: str, *args: object) -> None:
        """Log something that contains prompts or outputs: only with log_requests on."""
        if self.config.log_requests:
            logger.info(msg, *args)


def get_state(request: Request) -> ServerState:
    return request.app.state.bastion
