"""What callers ask of the engine thread (AsyncEngine), as typed commands: the thread
drains them between two steps, so nothing else ever touches the engine."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bastion.engine.request import Scheduling, TokenFilter
from bastion.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    token_filter: TokenFilter | None = None  # its `tracks` are added to the request
    scheduling: Scheduling | None = None  # priority and tenant (None: the defaults)
    cache_salt: str = ""  # prefix-cache namespace (the tenant's, so tenants share no cached prompt)


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class CallInEngine:
    """Run fn(engine) between two steps (e.g. load an adapter: no forward pass may race it)."""

    fn: Callable[[Any], Any]
    future: concurrent.futures.Future


Command = AddRequest | Abort | CallInEngine
