"""Runtime adapter management (vLLM's endpoint names), behind a separate admin key.

POST /v1/load_lora_adapter   {"lora_name": ..., "lora_path": ...}  -> 200 loaded | 202 pending | 400
POST /v1/unload_lora_adapter {"lora_name": ...}                     (a pending load is cancelled)
GET  /v1/lora_adapters[/NAME]  every load: pending, served or refused, with its findings

The admin key is distinct from the API key: users who may chat must not be able to
plug new weights into the server. Without --admin-key the endpoints answer 403. The key
is checked before the body is even parsed, so a caller without it learns nothing of the
schema. Loading goes through the vetting gate when one is configured: its quick checks
at once, the behaviour scan in the background (server/adapter_loads.py).
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
from bastion.server.adapter_loads import NameTaken
from bastion.server.errors import APIError
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
    """200 "loaded": vetted (static checks and, from the scan cache, the behaviour scan)
    and served. 202 "pending": static checks passed, the behaviour scan is queued; the
    adapter is served when it passes (GET /v1/lora_adapters follows it)."""
    body = await _admin_body(request, LoadAdapterRequest)
    state = get_state(request)
    loads, name, path = state.adapter_loads, body.lora_name, body.lora_path
    engine = state.models.lookup(None).engine
    try:
        loads.reserve(name)
    except NameTaken as e:
        raise APIError(e.status, str(e), param="lora_name", code=e.code) from None
    vetting = None
    try:
        # vetting reads and hashes files: off the event loop
        vetting = await asyncio.to_thread(loads.vet_now, name, path)
        too_large = await asyncio.to_thread(rank_too_large, path, getattr(engine, "lora_slot_rank", None))
        if too_large:
            raise ValueError(too_large)
        if vetting.scan_needed:
            position = loads.enqueue(name, path, vetting.report)
            return JSONResponse({"status": "pending", "lora_name": name, "vetting": "pending", "queue_position":
                                 position, "message": f"static checks passed; adapter {name!r} is served once its "
                                 "behaviour scan passes (GET /v1/lora_adapters shows its state)"}, status_code=202)
        await engine.load_adapter(name, path)
        loads.served(name, path, vetting.report)
    except ValueError as e:  # AdapterError, vetting refusal, LoRA not enabled
        loads.refused(name, path, getattr(e, "report", None) or getattr(vetting, "report", None), str(e))
        raise APIError(400, str(e), param="lora_path", code="adapter_refused") from None
    finally:
        loads.release(name)
    return JSONResponse({"status": "loaded", "lora_name": name, "vetting": vetting.verdict})


@router.post("/v1/unload_lora_adapter", openapi_extra=_schema(UnloadAdapterRequest))
async def unload_adapter(request: Request) -> JSONResponse:
    """Unload a served adapter, or cancel a pending one ("status": "cancelled")."""
    body = await _admin_body(request, UnloadAdapterRequest)
    state = get_state(request)
    if state.adapter_loads.cancel(body.lora_name):
        return JSONResponse({"status": "cancelled", "lora_name": body.lora_name})
    engine = state.models.lookup(None).engine
    if body.lora_name not in set(engine.adapter_names()):
        raise APIError(404, f"adapter {body.lora_name!r} is not loaded", param="lora_name", code="model_not_found")
    try:
        await engine.unload_adapter(body.lora_name)
    except ValueError as e:
        raise APIError(409, str(e), param="lora_name") from None
    state.models.remove(body.lora_name)
    state.adapter_loads.forget(body.lora_name)
    return JSONResponse({"status": "unloaded", "lora_name": body.lora_name})


@router.get("/v1/lora_adapters")
async def list_adapter_loads(request: Request) -> JSONResponse:
    """Every adapter load: pending (with its static findings), served or refused (with
    the findings that refused it), behind the admin key (paths and findings are the
    operator's business)."""
    _require_admin(request)
    return JSONResponse({"object": "list", "data": get_state(request).adapter_loads.list()})


@router.get("/v1/lora_adapters/{name}")
async def get_adapter_load(name: str, request: Request) -> JSONResponse:
    """One load with its whole scan report."""
    _require_admin(request)
    found = get_state(request).adapter_loads.get(name)
    if found is None:
        raise APIError(404, f"no load of adapter {name!r} is known", param="name", code="model_not_found")
    return JSONResponse(found)
