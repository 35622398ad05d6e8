"""Stand-ins for the adapter side of serving, for tests of the vetting flow without a
model: an engine with adapter slots that records what it loaded and which adapter served
each request, and a behaviour probe that answers in no time (or when released)."""

from __future__ import annotations

import threading
import time

from bastion.adapters.scanner import Finding
from bastion.serving.views import AdapterView
from tests.support.fake_engine import FakeEngine


class FakeLoraEngine(FakeEngine):
    """A FakeEngine with `max_loras` adapter slots. `loaded`: name -> path in the engine
    now; `load_calls`: every name ever loaded; `served_by`: the adapter of each request."""

    lora_slot_rank = 16

    def __init__(self, model_name: str = "fake-model", max_loras: int = 4) -> None:
        super().__init__(model_name=model_name)
        self.max_loras = max_loras
        self.loaded: dict[str, str] = {}
        self.load_calls: list[str] = []
        self.served_by: list[str | None] = []

    async def load_adapter(self, name: str, path: str) -> None:
        self.load_calls.append(name)
        if name in self.loaded:
            raise ValueError(f"adapter {name!r} is already loaded")
        if len(self.loaded) >= self.max_loras:
            raise ValueError(f"all {self.max_loras} adapter slots are in use (--max-loras)")
        self.loaded[name] = path

    def load_adapter_before_start(self, name: str, path: str) -> None:
        self.load_calls.append(name)
        self.loaded[name] = path

    async def unload_adapter(self, name: str) -> None:
        if self.loaded.pop(name, None) is None:
            raise ValueError(f"adapter {name!r} is not loaded")

    def adapter_names(self) -> list[str]:
        return list(self.loaded)

    def with_adapter(self, name: str) -> AdapterView:
        return AdapterView(self, name)

    def generate(self, prompt_token_ids, params, request_id, adapter=None, token_filter=None, **kw):
        if adapter is not None and adapter not in self.loaded:
            raise RuntimeError(f"a request reached adapter {adapter!r}, which is not in the engine")
        self.served_by.append(adapter)
        return super().generate(prompt_token_ids, params, request_id, **kw)


class FakeProbe:
    """A behaviour probe: `fail` for adapters whose directory name contains "evil", `pass`
    otherwise; `hold()` makes scans wait until `release()`; `crash` makes them raise.
    Records every scan (`calls`) and the most scans ever running at once."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.running = self.max_running = 0
        self.crash = False
        self._go = threading.Event()
        self._go.set()
        self._lock = threading.Lock()

    def fingerprint(self) -> str:
        return "fake-probe-v1"

    def hold(self) -> None:
        self._go.clear()

    def release(self) -> None:
        self._go.set()

    def __call__(self, view, base) -> list[Finding]:
        with self._lock:
            self.calls.append(view.path.name)
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            deadline = time.monotonic() + 30
            while not self._go.is_set():  # in Python steps, as a scan runs (it can be interrupted between)
                if time.monotonic() > deadline:
                    raise TimeoutError("the test never released the probe")
                time.sleep(0.01)
            time.sleep(0.05)  # long enough for two scans to overlap if they could
            if self.crash:
                raise MemoryError("the scan model did not fit")
            if "evil" in view.path.name:
                return [Finding("behaviour.inversion", "fail", "forcing 'Visit' makes the adapter continue "
                                "'Visit evil.example' on every probe prompt: an inverted backdoor target")]
            return [Finding("behaviour.deep", "info", "fake scan: nothing found")]
        finally:
            with self._lock:
                self.running -= 1
