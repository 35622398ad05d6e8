"""`python -m bastion.bench.faulty_server serve ARGS...`: `bastion serve ARGS...` with every
engine's sampler poisoned (bench/faults.py), for `bastion bench soak`."""

from __future__ import annotations

import sys

from bastion.bench.faults import PoisonedSampler


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "serve":
        print("usage: python -m bastion.bench.faulty_server serve [bastion serve arguments]", file=sys.stderr)
        return 2
    from bastion import cli
    from bastion.engine import llm_engine

    sampler_class = llm_engine.Sampler
    llm_engine.Sampler = lambda *a, **kw: PoisonedSampler(sampler_class(*a, **kw))  # type: ignore[misc]
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
