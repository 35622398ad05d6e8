"""Chat messages -> prompt token ids through the tokenizer's own chat template (every
front end uses this one function: the server, `bastion chat`, `bastion generate --chat`,
the vetting gate's behaviour probes)."""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant", "tool", "developer")


def encode_chat(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Raises ValueError for messages the template cannot take (the caller's input)."""
    if not messages:
        raise ValueError("messages must not be empty")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"invalid message: {str(m)[:80]}")
        if not isinstance(m.get("content", ""), str):
            raise ValueError("message content must be a string")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # template errors are the caller's input problem
        raise ValueError(f"chat template failed: {e}") from e
    if hasattr(ids, "keys"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)
