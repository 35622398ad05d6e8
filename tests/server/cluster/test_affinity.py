"""Affinity keys and rendezvous hashing (server/cluster/affinity.py): no Ray."""

from __future__ import annotations

import json
from collections import Counter

from bastion.server.cluster.affinity import AFFINITY_CHARS, rendezvous, route_key

LONG = "You are a careful assistant for the Bastion docs. " * 20  # > AFFINITY_CHARS


def _chat(system: str, user: str, model: str = "m") -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "system", "content": system},
                                                    {"role": "user", "content": user}]}).encode()


def test_a_shared_long_prefix_is_one_key_and_the_model_is_part_of_it():
    a = route_key("/v1/chat/completions", _chat(LONG, "first question"))
    b = route_key("/v1/chat/completions", _chat(LONG, "another question"))
    assert a == b and a is not None
    assert route_key("/v1/chat/completions", _chat(LONG, "first question", model="adapter-1")) != a
    assert route_key("/v1/chat/completions", _chat("Short system.", "q1")) != route_key(
        "/v1/chat/completions", _chat("Short system.", "q2"))  # short prompts key on their whole text
    assert len(a) <= AFFINITY_CHARS + len("m\n")


def test_completions_keys_and_what_has_no_key():
    body = json.dumps({"model": "m", "prompt": LONG + "tail one"}).encode()
    other = json.dumps({"model": "m", "prompt": [LONG + "tail two"]}).encode()
    assert route_key("/v1/completions", body) == route_key("/v1/completions", other) is not None
    ids = json.dumps({"model": "m", "prompt": [5, 6, 7]}).encode()
    assert route_key("/v1/completions", ids) is not None
    for path, raw in [("/v1/models", b""), ("/v1/chat/completions", b"{not json"),
                      ("/v1/chat/completions", b"[1, 2]"), ("/v1/chat/completions", b'{"messages": 3}'),
                      ("/v1/chat/completions", b'{"messages": [7]}'), ("/v1/completions", b'{"prompt": {}}')]:
        assert route_key(path, raw) is None, (path, raw)


def test_rendezvous_is_stable_spreads_and_moves_only_the_lost_replicas_keys():
    replicas = ["r-aaaa", "r-bbbb", "r-cccc"]
    keys = [f"m\nprefix {i}" for i in range(600)]
    placed = {k: rendezvous(k, replicas) for k in keys}
    assert placed == {k: rendezvous(k, list(reversed(replicas))) for k in keys}  # order does not matter
    counts = Counter(placed.values())
    assert set(counts) == set(replicas) and min(counts.values()) > 150  # ~200 each
    survivors = ["r-aaaa", "r-cccc"]
    moved = [k for k in keys if placed[k] != "r-bbbb" and rendezvous(k, survivors) != placed[k]]
    assert moved == []  # keys of the surviving replicas stay where their KV is
    assert rendezvous("k", []) is None
