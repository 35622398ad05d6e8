"""Owners are non-IID domains of real machine text; held-out never trains; canaries inserted."""

import pytest
import torch

from bastion.federated.data import DOMAINS, build_owner, byte_tokenizer

KW = dict(seq_len=32, train_records=96, heldout_records=8, canaries=2, canary_repeats=3, canary_refs=5, seed=0)


@pytest.fixture(scope="module")
def owners():
    return [build_owner(i, 4, byte_tokenizer(), **KW) for i in range(4)]


def test_one_domain_per_owner_with_fixed_shapes(owners):
    assert [o.domain for o in owners] == list(DOMAINS)
    for o in owners:
        assert o.train.shape == (96, 32) and o.heldout.shape == (8, 32) and o.train.dtype == torch.long


def test_heldout_records_never_appear_in_training(owners):
    for o in owners:
        train_rows = {tuple(r) for r in o.train.tolist()}
        assert not any(tuple(r) in train_rows for r in o.heldout.tolist())


def test_canaries_inserted_repeat_times_and_references_differ(owners):
    for o in owners:
        for prefix, secret, refs in zip(o.canary_prefixes, o.canary_secrets, o.reference_secrets):
            canary = list(prefix + secret)[:32]
            hits = sum(r[: len(canary)] == canary for r in o.train.tolist())
            assert hits == 3
            assert secret not in refs and len(refs) == 5


def test_deterministic(owners):
    again = build_owner(2, 4, byte_tokenizer(), **KW)
    assert torch.equal(again.train, owners[2].train)


def test_python_docs_ignore_the_process_state(monkeypatch):
    """Owners are rebuilt in every ClientApp process and in checking processes: what a
    process imported or monkeypatched (Ray patches inspect.isgenerator) must not change
    the documents, or train / held-out would split differently there."""
    import inspect

    from bastion.federated.data import SOURCES

    def texts():
        return [(doc_id, read()) for doc_id, read in SOURCES["python-docs"]()]

    before = texts()
    monkeypatch.setattr(inspect, "isgenerator", lambda obj: False)
    assert texts() == before and len(before) > 100
