"""An adapter hot-loaded over HTTP that is larger than the adapter slots is refused with
the flag to raise (issue 23: a FLoRA export has rank rounds x the owners' ranks)."""

from __future__ import annotations

import json

from bastion.config import ServerConfig
from tests.support.fake_engine import FakeEngine
from tests.support.servers import ServerThread


class _SlotsOf16(FakeEngine):
    lora_slot_rank = 16

    async def load_adapter(self, name, path):  # pragma: no cover - must not be reached
        raise AssertionError("a too-large adapter reached the engine")


def test_too_large_adapter_is_refused_naming_the_flag(tmp_path):
    adapter = tmp_path / "flora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 30}))
    handle = ServerThread.start(_SlotsOf16(), ServerConfig(admin_key="adm"))
    try:
        with handle.http() as http:
            r = http.post("/v1/load_lora_adapter", headers={"X-Admin-Key": "adm"},
                          json={"lora_name": "fed", "lora_path": str(adapter)})
    finally:
        handle.stop()
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "lora_path" and "--max-lora-rank 30" in error["message"]
