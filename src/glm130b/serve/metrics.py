"""Prometheus metrics of the server: queue, batch occupancy, tokens/s, latencies (GET /metrics)."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets in seconds: from one fast decode step on a GPU to a long request on a CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# tokens/s is the rate over this many recent seconds (short enough to follow a load change).
RATE_WINDOW_S = 10.0


class ServeMetrics:
    """One registry per server (tests run several in one process)."""

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue = Gauge("glm130b_queue_length", "sequences waiting for a cache row", registry=r)
        self.running = Gauge("glm130b_running_sequences", "sequences holding a cache row", registry=r)
        self.occupancy = Gauge("glm130b_batch_occupancy", "share of the cache rows in use (0..1)", registry=r)
        self.tokens_per_s = Gauge(
            "glm130b_tokens_per_second", f"generated tokens/s over the last {RATE_WINDOW_S:g} s", registry=r
        )
        self.tokens = Counter("glm130b_generated_tokens", "tokens generated", registry=r)
        self.requests = Counter("glm130b_requests", "completion requests by outcome", ["status"], registry=r)
        self.latency = Histogram(
            "glm130b_request_latency_seconds", "request arrival to last token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.first_token = Histogram(
            "glm130b_time_to_first_token_seconds", "request arrival to first text", buckets=LATENCY_BUCKETS, registry=r
        )
        self.step_time = Histogram(
            "glm130b_step_seconds", "one engine step (prefills + one decode)", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue.set_function(lambda: engine.queue_length)
        self.running.set_function(lambda: engine.running)
        self.occupancy.set_function(lambda: engine.running / engine.max_batch)
        self.tokens_per_s.set_function(self._rate)
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def on_step(self, rows: int, tokens: int, seconds: float) -> None:
        """Called by the engine thread after each step."""
        self.step_time.observe(seconds)
        self.tokens.inc(tokens)
        with self._lock:
            self._recent.append((time.monotonic(), tokens))

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW_S
