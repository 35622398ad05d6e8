"""Server test harness: real uvicorn servers on loopback, in background threads.

`api_server` is parametrized over backends: "fake" (FakeEngine) and "real" (the session
fixture `real_engine` from tests/conftest.py). Tests written against `api_server` must hold for any engine;
tests that need fault injection or exact output use `fake_server` directly.

The harness builds plain uvicorn servers around `build_app`, so stopping a test
server never shuts an engine down: engines belong to their fixtures.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from bastion.server.auth import API_KEY_ENV
from tests.support.fake_engine import FakeEngine
from tests.support.servers import ServerThread


@pytest.fixture(scope="session", autouse=True)
def _no_ambient_api_key() -> Iterator[None]:
    """A developer's exported BASTION_API_KEY would put every test server behind a key."""
    saved = os.environ.pop(API_KEY_ENV, None)
    yield
    if saved is not None:
        os.environ[API_KEY_ENV] = saved


@pytest.fixture(scope="session")
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="session")
def fake_server(fake_engine: FakeEngine) -> Iterator[ServerThread]:
    handle = ServerThread.start(fake_engine)
    yield handle
    handle.stop()


@pytest.fixture(autouse=True)
def _reset_fake(fake_engine: FakeEngine) -> Iterator[None]:
    yield
    fake_engine.token_delay_s = 0.0
    fake_engine._injected.clear()
    fake_engine.revive()


@pytest.fixture(scope="session")
def real_server(real_engine) -> Iterator[ServerThread]:
    """One server for the whole session around `real_engine` (tests that need other
    server settings start their own around the same engine)."""
    handle = ServerThread.start(real_engine)
    yield handle
    handle.stop()


@pytest.fixture(scope="session", params=["fake", pytest.param("real", marks=pytest.mark.slow)])
def api_server(request: pytest.FixtureRequest) -> ServerThread:
    return request.getfixturevalue("fake_server" if request.param == "fake" else "real_server")


