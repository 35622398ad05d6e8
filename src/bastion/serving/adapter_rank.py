"""How large the engine's adapter slots must be for the adapters a user names.

The engine's LoRA slots have one rank R for all adapters, fixed when they are allocated.
Without an explicit --max-lora-rank, R is sized from the adapters given at start (at
least DEFAULT_SLOT_RANK), so an adapter such as a FLoRA export (rank = rounds x the
owners' ranks, e.g. 30) serves as made. Ranks come from adapter_config.json only (`r`
and `rank_pattern`); the vetting gate and the loader check them against the tensors.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from bastion.safe_io import read_regular

DEFAULT_SLOT_RANK = 16
# Auto-sizing stops here (the scanner's own limit): larger slots take memory for every
# adapter slot, so a larger rank must be asked for explicitly.
MAX_AUTO_RANK = 1024
_MAX_CONFIG_BYTES = 1 << 20


def declared_rank(path: str | Path) -> int | None:
    """The largest rank adapter_config.json declares, or None when it cannot be read
    (whoever loads the adapter then reports the problem)."""
    try:
        cfg = json.loads(read_regular(Path(path) / "adapter_config.json", _MAX_CONFIG_BYTES))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    ranks = [cfg.get("r", 8)]
    pattern = cfg.get("rank_pattern")
    if isinstance(pattern, dict):
        ranks += list(pattern.values())
    ranks = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool) and r > 0]
    return max(ranks) if ranks else None


def slot_rank(explicit: int | None, paths: Iterable[str | Path]) -> int:
    """--max-lora-rank when given; else the largest declared rank of `paths` (the
    adapters loaded at start), at least DEFAULT_SLOT_RANK."""
    if explicit is not None:
        return explicit
    rank = DEFAULT_SLOT_RANK
    for path in paths:
        r = declared_rank(path)
        if r is not None and r > MAX_AUTO_RANK:
            raise ValueError(f"adapter {path} declares rank {r}: slots are sized automatically up to "
                             f"{MAX_AUTO_RANK}; pass --max-lora-rank {r} to allocate them anyway")
        rank = max(rank, r or 0)
    return rank


def rank_too_large(path: str | Path, limit: int | None) -> str | None:
    """Why an adapter loaded at run time cannot fit slots of rank `limit`, or None."""
    rank = declared_rank(path)
    if limit is None or rank is None or rank <= limit:
        return None
    return (f"adapter rank {rank} exceeds the adapter slots' rank {limit}, which is fixed when the server "
            f"starts: restart `bastion serve` with --max-lora-rank {rank} (or higher)")
