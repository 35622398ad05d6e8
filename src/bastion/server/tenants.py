"""Tenants: who a request is served for, what they may use, and how much.

With `--api-keys FILE` every key is a tenant (ApiKeyConfig: name, secret, limits, adapter
list, fair-share weight); a lone `--api-key` is one tenant named "default" with no limits;
without keys every request is the anonymous tenant "" (then, for fair scheduling on a
trusted network, the OpenAI `user` field names the tenant).

Per request the server asks:
* `identify(secret)` (auth middleware): the tenant a Bearer key belongs to, or None. The
  secrets are compared as SHA-256 digests in a dict, so the lookup time says nothing of
  how much of a wrong key matched.
* `visible(tenant, model)`: a key restricted to some adapters sees only those (and the
  base model): others answer 404 as if they did not exist, and /v1/models omits them.
* `admit(tenant, prompt_tokens, n)`: a `Lease` on one of its `max_concurrent` slots and
  room in its `tokens_per_min` (a sliding 60 s window of prompt tokens, charged now, and
  generated tokens, charged as each generation closes), or a 429 with Retry-After. The
  lease is released by the last of the request's `n` generations to close, however it
  ends (finished, client gone, error), so a slot never leaks.

The engine sees a tenant only as `Scheduling(tenant, weight)` and a prefix-cache salt:
tenants never share cached prompt blocks, so one cannot learn another's prompts from
time-to-first-token.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from bastion.config import ApiKeyConfig, ServerConfig
from bastion.engine.request import Scheduling
from bastion.server.errors import APIError

WINDOW_S = 60.0
ANONYMOUS = ""
DEFAULT_KEY_TENANT = "default"  # the name of the lone --api-key


@dataclass
class Tenant:
    config: ApiKeyConfig | None  # None: anonymous or the lone --api-key (no limits, sees everything)
    name: str
    in_flight: int = 0
    # (time, tokens) charged in the last WINDOW_S seconds, oldest first
    window: deque[tuple[float, int]] = field(default_factory=deque)

    @property
    def weight(self) -> float:
        return self.config.weight if self.config else 1.0

    def scheduling(self, priority: int = 0) -> Scheduling:
        return Scheduling(priority=priority, tenant=self.name, weight=self.weight)

    @property
    def cache_salt(self) -> str:
        return f"tenant:{self.name}" if self.name else ""


class Lease:
    """One admitted request's hold on its tenant's concurrency slot; `close_one()` per
    generation, the last one frees the slot and charges the tokens generated."""

    def __init__(self, tenants: Tenants, tenant: Tenant, parts: int) -> None:
        self._tenants, self.tenant, self._open = tenants, tenant, parts

    def close_one(self, generated_tokens: int = 0) -> None:
        self._tenants.release(self, generated_tokens)


class Tenants:
    def __init__(self, config: ServerConfig, api_key: str | None) -> None:
        self._lock = threading.Lock()
        self._by_digest: dict[bytes, Tenant] = {}
        self.anonymous = Tenant(None, ANONYMOUS)
        for key in config.api_keys:
            self._by_digest[_digest(key.key)] = Tenant(key, key.name)
        if api_key and _digest(api_key) not in self._by_digest:
            self._by_digest[_digest(api_key)] = Tenant(None, DEFAULT_KEY_TENANT)

    @property
    def keyed(self) -> bool:
        """Whether a key is required (any configured)."""
        return bool(self._by_digest)

    def identify(self, secret: bytes | str) -> Tenant | None:
        return self._by_digest.get(_digest(secret))

    def from_authorization(self, header: bytes | str) -> Tenant | None:
        """The tenant of an `Authorization: Bearer KEY` header value (the scheme is
        case-insensitive, RFC 7235), or None."""
        raw = header.encode() if isinstance(header, str) else header
        scheme, _, token = raw.strip().partition(b" ")
        return self.identify(token.strip()) if scheme.lower() == b"bearer" else None

    def for_request(self, tenant: Tenant | None, user: str | None) -> Tenant:
        """The tenant a request is served for: its key's, else (no keys configured) the
        one its `user` field names, else the anonymous one."""
        if tenant is not None:
            return tenant
        if user and not self.keyed:
            return Tenant(None, f"user:{user[:64]}")
        return self.anonymous

    def all(self) -> list[Tenant]:
        return list(self._by_digest.values())

    # ------------------------------------------------------------ access
    @staticmethod
    def visible(tenant: Tenant, adapter: str | None) -> bool:
        """May `tenant` see and use this model (adapter None: the base model)?"""
        allowed = tenant.config.adapters if tenant.config else None
        return adapter is None or allowed is None or adapter in allowed

    # ------------------------------------------------------------ limits
    def admit(self, tenant: Tenant, prompt_tokens: int, parts: int = 1, now: float | None = None) -> Lease:
        now = time.monotonic() if now is None else now
        limits = tenant.config
        with self._lock:
            if limits is not None and limits.max_concurrent is not None and tenant.in_flight >= limits.max_concurrent:
                raise APIError(429, f"API key '{tenant.name}' already has {tenant.in_flight} requests in flight, its "
                                    f"limit; retry when one finishes.", type="requests", code="rate_limit_exceeded",
                               headers={"Retry-After": "1"})
            if limits is not None and limits.tokens_per_min is not None:
                self._expire(tenant, now)
                used = sum(n for _, n in tenant.window)
                if used + prompt_tokens > limits.tokens_per_min:
                    wait = _retry_after(tenant, now, used + prompt_tokens - limits.tokens_per_min)
                    raise APIError(429, f"API key '{tenant.name}' used {used} of its {limits.tokens_per_min} tokens "
                                        f"per minute; this request's prompt has {prompt_tokens}.", type="tokens",
                                   code="rate_limit_exceeded", headers={"Retry-After": str(wait)})
            tenant.in_flight += 1
            self._charge(tenant, prompt_tokens, now)
        return Lease(self, tenant, parts)

    def release(self, lease: Lease, generated_tokens: int) -> None:
        with self._lock:
            if lease._open <= 0:
                return  # NOTE: closing twice is harmless (aclose is idempotent too)
            lease._open -= 1
            self._charge(lease.tenant, generated_tokens, time.monotonic())
            if lease._open == 0:
                lease.tenant.in_flight -= 1

    @staticmethod
    def _charge(tenant: Tenant, tokens: int, now: float) -> None:
        if tokens > 0 and tenant.config is not None and tenant.config.tokens_per_min is not None:
            tenant.window.append((now, tokens))

    @staticmethod
    def _expire(tenant: Tenant, now: float) -> None:
        while tenant.window and tenant.window[0][0] <= now - WINDOW_S:
            tenant.window.popleft()


def _retry_after(tenant: Tenant, now: float, excess: int) -> int:
    """Whole seconds until `excess` tokens have left the window (at least 1)."""
    freed = 0
    for t, n in tenant.window:
        freed += n
        if freed >= excess:
            return max(1, math.ceil(t + WINDOW_S - now))
    return math.ceil(WINDOW_S)


def _digest(secret: bytes | str) -> bytes:
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).digest()
