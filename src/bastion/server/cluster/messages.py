"""What the front and the replicas send each other through Ray (pickled; plain data).

A forwarded call is `ForwardedRequest` in, and out a stream of: the replica's id (as soon
as it starts: the request was routed), one `Head` (status and headers, once the app
started its response), then the body as `bytes` chunks (several of the app's chunks
coalesced when they queue up, so a token stream costs fewer Ray objects under load).
"""

from __future__ import annotations

from dataclasses import dataclass

Headers = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class ForwardedRequest:
    method: str
    path: str
    query: bytes
    headers: Headers  # lower-case names, as ASGI has them
    body: bytes
    client: tuple[str, int] | None = None


@dataclass(frozen=True)
class Head:
    status: int
    headers: Headers

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


class NotThisReplica(Exception):
    """A call pinned to a replica that is gone landed on another one."""
