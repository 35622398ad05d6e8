"""The model ids this server answers to, and which engine serves each.

Today there is one entry (engine.model_name). Adapters will add entries that share
the base engine (`parent` names the base id), which is why requests resolve a model
id through this table instead of comparing against engine.model_name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from bastion.server.errors import APIError
from bastion.server.protocol import ModelCard


@dataclass(frozen=True)
class ServedModel:
    id: str
    engine: Any  # an AsyncEngine (or something with the same interface)
    parent: str | None = None
    vetting: str | None = None  # the gate's verdict on the adapter (None: base model, or no gate)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def adapter(self) -> str | None:
        """The adapter this id serves (None: the base model)."""
        return None if self.parent is None else self.id

    def card(self) -> ModelCard:
        return ModelCard(id=self.id, created=self.created, max_model_len=self.engine.max_model_len,
                         parent=self.parent, vetting=self.vetting)


class ServedModels:
    def __init__(self, default: ServedModel) -> None:
        self._default = default
        self._by_id: dict[str, ServedModel] = {default.id: default}

    def add(self, model: ServedModel) -> None:
        if model.id in self._by_id:
            raise ValueError(f"model id {model.id!r} is already served")
        self._by_id[model.id] = model

    def resolve(self, model_id: str | None) -> ServedModel:
        """The entry for `model_id`; None or "" means the default model (as vLLM does)."""
        if not model_id:
            return self._default
        try:
            return self._by_id[model_id]
        except KeyError:
            known = ", ".join(sorted(self._by_id))
            raise APIError(404, f"The model '{model_id}' does not exist. Served models: {known}.",
                           param="model", code="model_not_found") from None

    def remove(self, model_id: str) -> None:
        if model_id == self._default.id:
            raise ValueError("the base model cannot be removed")
        self._by_id.pop(model_id, None)

    def all(self) -> list[ServedModel]:
        return list(self._by_id.values())
