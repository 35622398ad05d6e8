"""Prometheus metrics, one CollectorRegistry per app.

A private registry (never prometheus_client's global REGISTRY) so several apps can
live in one process (tests start many) without "Duplicated timeseries" errors, and
so /metrics shows only Bastion's series.

Two sources:
* the engine's own state (queue depth, running requests, KV blocks, preemptions) is
  read from `engine.stats()` at scrape time by `_EngineCollector`, so it is always
  current and costs nothing between scrapes;
* per-request timings and token counts are observed by the server as deltas stream
  out (`RequestTimer`), which is where TTFT and inter-token latency are visible.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)


class ThroughputMeter:
    """Generated tokens per second over a sliding window (default 10 s)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()  # read from the scrape, written from the loop

    def add(self, n: int, now: float | None = None) -> None:
        with self._lock:
            self._events.append((time.monotonic() if now is None else now, n))

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._events and self._events[0][0] < now - self.window_s:
                self._events.popleft()
            return sum(n for _, n in self._events) / self.window_s


class _EngineCollector:
    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def describe(self) -> list[Metric]:
        return []  # no stats() call at registration; the engine may not be warm yet

    def collect(self) -> Iterator[Metric]:
        try:
            s = self._engine.stats()
        except Exception:  # noqa: BLE001 - a dead engine must not break /metrics
            return
        yield GaugeMetricFamily("bastion_queue_depth", "Requests waiting to be scheduled.", value=s.num_waiting)
        yield GaugeMetricFamily("bastion_running_requests", "Requests in the running batch.", value=s.num_running)
        yield GaugeMetricFamily("bastion_kv_blocks_used", "KV cache blocks in use.", value=s.kv_blocks_used)
        yield GaugeMetricFamily("bastion_kv_blocks_free", "KV cache blocks free.",
                                value=s.kv_blocks_total - s.kv_blocks_used)
        yield GaugeMetricFamily("bastion_kv_blocks_total", "KV cache blocks in the pool.", value=s.kv_blocks_total)
        yield GaugeMetricFamily("bastion_model_weight_bytes", "Bytes the model's weights hold in memory.",
                                value=s.weight_bytes)
        if s.moe_expert_lookups:  # expert offload (--moe-memory) only
            yield GaugeMetricFamily("bastion_moe_expert_hit_rate", "Share of expert activations found in RAM.",
                                    value=s.moe_expert_hits / s.moe_expert_lookups)
            yield GaugeMetricFamily("bastion_moe_bytes_read_per_token", "Expert bytes read from the model file "
                                    "per token.", value=s.moe_bytes_read / max(1, s.moe_tokens))
            yield CounterMetricFamily("bastion_moe_expert_bytes_read", "Expert bytes read from the model file.",
                                      value=s.moe_bytes_read)
        yield CounterMetricFamily("bastion_preemptions", "Requests preempted (recomputed) for lack of KV blocks.",
                                  value=s.num_preemptions)


class ServerMetrics:
    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.throughput = ThroughputMeter()
        self.prompt_tokens = Counter("bastion_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("bastion_generation_tokens", "Tokens generated.", registry=r)
        self.requests_finished = Counter("bastion_requests_finished", "Requests finished, by reason.",
                                         ["finish_reason"], registry=r)
        self.requests_rejected = Counter("bastion_requests_rejected", "Requests refused, by HTTP status.",
                                         ["status"], registry=r)
        self.ttft = Histogram("bastion_time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("bastion_inter_token_latency_seconds", "Time between generated tokens.",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("bastion_e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=_E2E_BUCKETS, registry=r)
        tps = Gauge("bastion_generation_tokens_per_second", "Generated tokens/s over the last 10 s.", registry=r)
        tps.set_function(self.throughput.rate)
        r.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self, arrival: float) -> RequestTimer:
        return RequestTimer(self, arrival)


class RequestTimer:
    """Observes one request's timings as its deltas arrive."""

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self._m = metrics
        self._arrival = arrival
        self._last: float | None = None  # time of the previous token-bearing delta

    def prompt(self, n_tokens: int) -> None:
        self._m.prompt_tokens.inc(n_tokens)

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.monotonic()
        if self._last is None:
            self._m.ttft.observe(now - self._arrival)
        else:
            # A delta may carry several tokens (e.g. a stop-string hold-back released
            # at once); spread the gap over them so the histogram stays per token.
            gap = (now - self._last) / n
            for _ in range(n):
                self._m.itl.observe(gap)
        self._last = now
        self._m.generation_tokens.inc(n)
        self._m.throughput.add(n, now)

    def cancelled(self) -> None:
        """Closed before finishing (client gone, error): counted, but kept out of the
        latency histograms, which describe completed requests."""
        self._m.requests_finished.labels(finish_reason="cancelled").inc()

    def finished(self, reason: str | None) -> None:
        self._m.e2e.observe(time.monotonic() - self._arrival)
        self._m.requests_finished.labels(finish_reason=reason or "unknown").inc()
