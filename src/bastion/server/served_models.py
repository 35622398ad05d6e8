"""The model ids this server answers to, and which engine serves each.

The base model's id (engine.model_name) and one entry per adapter, sharing the base
engine (`parent` names the base id), which is why requests resolve a model id through
this table instead of comparing against engine.model_name. An adapter whose behaviour
scan has not finished is listed as pending (`vetting` "pending") but never resolved for
a request: its entry holds the base engine, not the adapter. The background vetting
thread changes the table too, hence the lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bastion.server.errors import APIError
from bastion.server.protocol import ModelCard

PENDING = "pending"
PENDING_RETRY_AFTER_S = 10  # a behaviour scan takes about a minute


@dataclass(frozen=True)
class ServedModel:
    id: str
    engine: Any  # an AsyncEngine (or something with the same interface)
    parent: str | None = None
    vetting: str | None = None  # the gate's verdict on the adapter, "pending" while it is scanned (None: base)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def adapter(self) -> str | None:
        """The adapter this id serves (None: the base model)."""
        return None if self.parent is None else self.id

    @property
    def pending(self) -> bool:
        return self.vetting == PENDING

    def card(self) -> ModelCard:
        return ModelCard(id=self.id, created=self.created, max_model_len=self.engine.max_model_len,
                         parent=self.parent, vetting=self.vetting)


class ServedModels:
    def __init__(self, default: ServedModel) -> None:
        self._default = default
        self._by_id: dict[str, ServedModel] = {default.id: default}
        self._lock = threading.Lock()

    def add(self, model: ServedModel) -> None:
        with self._lock:
            if model.id in self._by_id:
                raise ValueError(f"model id {model.id!r} is already served")
            self._by_id[model.id] = model

    def replace(self, model: ServedModel) -> None:
        """Put `model` in place of the entry of the same id (a pending adapter now served)."""
        if model.id == self._default.id:
            raise ValueError("the base model cannot be replaced")
        with self._lock:
            self._by_id[model.id] = model

    def lookup(self, model_id: str | None, visible: Callable[[ServedModel], bool] | None = None) -> ServedModel:
        """The entry for `model_id`, pending or not; None or "" means the default model.
        `visible`: what the caller may see (a tenant's adapter list); the others are
        answered as if they did not exist, and the error lists only the visible ones."""
        if not model_id:
            return self._default
        with self._lock:
            found = self._by_id.get(model_id)
            if found is not None and visible is not None and not visible(found):
                found = None
            if found is None:
                known = ", ".join(sorted(m.id for m in self._by_id.values() if visible is None or visible(m)))
        if found is None:
            raise APIError(404, f"The model '{model_id}' does not exist. Served models: {known}.",
                           param="model", code="model_not_found")
        return found

    def resolve(self, model_id: str | None, visible: Callable[[ServedModel], bool] | None = None) -> ServedModel:
        """The entry that serves a request for `model_id` (None or "": the default model,
        as vLLM does); an adapter still being vetted is an error (409), never served."""
        found = self.lookup(model_id, visible)
        if found.pending:
            raise APIError(409, f"The adapter '{model_id}' is being vetted: its behaviour scan runs before it is "
                                "served. Retry when /v1/models lists it with a verdict.",
                           param="model", code="adapter_pending",
                           headers={"Retry-After": str(PENDING_RETRY_AFTER_S)})
        return found

    def remove(self, model_id: str) -> None:
        if model_id == self._default.id:
            raise ValueError("the base model cannot be removed")
        with self._lock:
            self._by_id.pop(model_id, None)

    def all(self, visible: Callable[[ServedModel], bool] | None = None) -> list[ServedModel]:
        with self._lock:
            return [m for m in self._by_id.values() if visible is None or visible(m)]
