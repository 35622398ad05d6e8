"""Which replica a request would like: pure functions, no Ray (the router and the front
share them; tests/server/cluster/test_affinity.py holds them without a cluster).

A request's *affinity key* is the served model (the base or an adapter: its weights and
its prefix-cache salt live on the replicas that served it) plus the first
`AFFINITY_CHARS` characters of its prompt text: the flattened chat messages (system prompt
and first turns, so every later turn of a conversation keeps the key of its first) or the
completion prompt. Requests whose texts agree that far share at least that much prompt,
and the replica that computed it keeps those KV blocks in its prefix cache.

Keys map to replicas by rendezvous (highest random weight) hashing: each (key, replica)
pair gets a pseudo-random score and the highest-scoring live replica wins. It needs no
shared state, agrees across fronts, and a replica joining or leaving moves only the keys
it wins or held (1/N of them), so the other replicas' caches stay warm.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

# ~128 tokens of English: long enough that unrelated chats with one generic system prompt
# still differ when it is short, short enough that a shared long prefix (a document, a
# long system prompt) decides alone. Prompts shorter than this key on their whole text.
AFFINITY_CHARS = 512

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


def route_key(path: str, body: bytes) -> str | None:
    """The affinity key of a request to `path` with JSON `body`, or None (nothing to keep:
    other endpoints, or a body the replica will refuse anyway: any replica may say so)."""
    if path not in GENERATION_PATHS or not body:
        return None
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(payload, dict):
        return None
    model = payload.get("model")
    model = model if isinstance(model, str) else ""
    text = _chat_text(payload.get("messages")) if path == "/v1/chat/completions" else _prompt_text(
        payload.get("prompt"))
    if text is None:
        return None
    return f"{model}\n{text[:AFFINITY_CHARS]}"


def _chat_text(messages: object) -> str | None:
    if not isinstance(messages, list):
        return None
    parts: list[str] = []
    size = 0
    for m in messages:  # stop once the window is full: a long history costs nothing here
        if size >= AFFINITY_CHARS:
            break
        if not isinstance(m, dict):
            return None
        piece = f"{m.get('role', '')}:{_content_text(m.get('content'))}\n"
        parts.append(piece)
        size += len(piece)
    return "".join(parts)


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: [{"type": "text", "text": ...}]
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _prompt_text(prompt: object) -> str | None:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):  # a batch of prompts: the first one's prefix
            return first
        if all(isinstance(t, int) for t in prompt[:AFFINITY_CHARS]):  # token ids
            return ",".join(str(t) for t in prompt[:AFFINITY_CHARS // 4])
    return None


def score(key: str, replica: str) -> int:
    """The rendezvous weight of `replica` for `key` (64 bits of blake2b: stable across
    processes and Python's hash seeds)."""
    digest = hashlib.blake2b(f"{replica}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous(key: str, replicas: Iterable[str]) -> str | None:
    """The replica `key` maps to among `replicas` (None when there are none)."""
    return max(replicas, key=lambda r: score(key, r), default=None)
