"""Runtime adapter management (vLLM's endpoint names), behind a separate admin key.

POST /v1/load_lora_adapter   {"lora_name": ..., "lora_path": ...}
POST /v1/unload_lora_adapter {"lora_name": ...}

The admin key is distinct from the API key: users who may chat must not be able to
plug new weights into the server. Without --admin-key the endpoints answer 403. The key
is checked before the body is even parsed, so a caller without it learns nothing of the
schema. Loading goes through the engine's vetting gate when one is configured.
"""

from __future__ import annotations

import asyncio
import hmac
import os

from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bastion.config import ADAPTER_NAME_PATTERN
from bastion.server.errors import APIError
from bastion.server.served_models import ServedModel
from bastion.server.state import get_state
from bastion.serving.adapter_rank import rank_too_large

router = APIRouter()
ADMIN_KEY_ENV = "BASTION_ADMIN_KEY"
Body = TypeVar("Body", bound=BaseModel)


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str = Field(min_length=1, max_length=128, pattern=ADAPTER_NAME_PATTERN)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str = Field(min_length=1, max_length=128)


async def _admin_body(request: Request, model: type[Body]) -> Body:
    """The body, parsed only after the admin key was checked (FastAPI would parse a
    declared body parameter first, telling a caller without the key about the schema)."""
    _require_admin(request)
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_input=False)) from None


def _schema(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _require_admin(request: Request) -> None:
    key = get_state(request).config.admin_key or os.environ.get(ADMIN_KEY_ENV)
    if not key:
        raise APIError(403, "Runtime adapter management is disabled (start the server with --admin-key).",
                       type="permission_error", code="admin_disabled")
    given = request.headers.get("x-admin-key", "").encode()
    if not hmac.compare_digest(given, key.encode()):
        raise APIError(401, "Missing or incorrect admin key (X-Admin-Key header).", code="invalid_admin_key")


@router.post("/v1/load_lora_adapter", openapi_extra=_schema(LoadAdapterRequest))
async def load_adapter(request: Request) -> JSONResponse:
    body = await _admin_body(request, LoadAdapterRequest)
    state = get_state(request)
    base = state.models.resolve(None)
    engine = base.engine
    if body.lora_name in {m.id for m in state.models.all()}:
        raise APIError(400, f"model id {body.lora_name!r} is already served", param="lora_name")
    try:
        # vetting reads and hashes files: off the event loop
        report = await asyncio.to_thread(state.policy.vet, body.lora_name, body.lora_path)
        too_large = await asyncio.to_thread(rank_too_large, body.lora_path, getattr(engine, "lora_slot_rank", None))
        if too_large:
            raise ValueError(too_large)
        await engine.load_adapter(body.lora_name, body.lora_path)
    except ValueError as e:  # AdapterError, vetting refusal, LoRA not enabled
        raise APIError(400, str(e), param="lora_path", code="adapter_refused") from None
    verdict = getattr(report, "verdict", None)
    state.models.add(ServedModel(id=body.lora_name, engine=engine.with_adapter(body.lora_name), parent=base.id,
                                 vetting=verdict))
    return JSONResponse({"status": "loaded", "lora_name": body.lora_name, "vetting": verdict})


@router.post("/v1/unload_lora_adapter", openapi_extra=_schema(UnloadAdapterRequest))
async def unload_adapter(request: Request) -> JSONResponse:
    body = await _admin_body(request, UnloadAdapterRequest)
    state = get_state(request)
    if body.lora_name not in set(state.models.resolve(None).engine.adapter_names()):
        raise APIError(404, f"adapter {body.lora_name!r} is not loaded", param="lora_name", code="model_not_found")
    try:
        await state.models.resolve(None).engine.unload_adapter(body.lora_name)
    except ValueError as e:
        raise APIError(409, str(e), param="lora_name") from None
    state.models.remove(body.lora_name)
    return JSONResponse({"status": "unloaded", "lora_name": body.lora_name})
