"""What `clickvec run` measures while it streams: produce -> vector latency, rates, the
worker's own metrics."""

from __future__ import annotations

import time
from collections import deque

from clickvec.run.children import scrape_metrics
from clickvec.run.observer import Observer
from clickvec.run.traffic import LiveProducer
from clickvec.run.view import LatencyHistogram, percentiles

WINDOW_S = 10.0  # the live view's "last 10 s" latency
RATE_WINDOW_S = 5.0
MATCH_WAIT_MS = 30_000  # a vector whose event's delivery report has not come yet


class Meter:
    """Latency from each event's produce time (its Kafka CreateTime, recorded by the
    producer's delivery report) to its vector, never from the event's own timestamp:
    replayed data carries event times from the past."""

    def __init__(self) -> None:
        self.latency = LatencyHistogram()  # produced -> vector received here
        self.emit_latency = LatencyHistogram()  # produced -> vector emitted by the worker
        self.window: deque[tuple[float, float]] = deque()  # (monotonic, ms) last WINDOW_S
        self.unmatched = 0
        self.rates: deque[tuple[float, int, int, float | None]] = deque()  # t, sent, vectors, worker in
        self.worker_port = 0
        self.metrics: dict[str, float] = {}

    def tick(self, obs: Observer, prod: LiveProducer) -> None:
        """Match vectors to their events' produce times; sample rates and worker metrics."""
        now = time.monotonic()
        self.match(obs, prod, now, time.time() * 1000)
        if self.worker_port:
            self.metrics = scrape_metrics(self.worker_port) or self.metrics
        with obs.lock:
            vectors = obs.counts["out"]
        self.rates.append((now, prod.sent, vectors, self.metrics.get("clickvec_events_in_total")))
        while len(self.rates) > 2 and self.rates[0][0] < now - RATE_WINDOW_S:
            self.rates.popleft()

    def match(self, obs: Observer, prod: LiveProducer, now: float, wall_ms: float) -> None:
        with obs.lock:
            pending = list(obs.pending)
            obs.pending.clear()
        keep = []
        with prod.lock:
            for p, off, recv_ms, emit_ms in pending:
                created = prod.create_ts.pop((p, off), None)
                if created is None:
                    if wall_ms - recv_ms < MATCH_WAIT_MS:
                        keep.append((p, off, recv_ms, emit_ms))
                    else:
                        self.unmatched += 1
                    continue
                ms = max(0.0, recv_ms - created)
                self.latency.add(ms)
                self.emit_latency.add(max(0.0, emit_ms - created))
                self.window.append((now, ms))
        if keep:
            with obs.lock:
                obs.pending.extendleft(reversed(keep))
        while self.window and self.window[0][0] < now - WINDOW_S:
            self.window.popleft()

    def recent(self) -> list[float | None]:
        """p50, p95, p99 of the last WINDOW_S seconds."""
        return percentiles([ms for _, ms in self.window])

    def rates_now(self) -> tuple[float, float, float | None]:
        """(events/s produced, vectors/s read back, events/s the worker consumed)."""
        if len(self.rates) < 2:
            return 0.0, 0.0, None
        (t0, p0, v0, w0), (t1, p1, v1, w1) = self.rates[0], self.rates[-1]
        dt = max(1e-6, t1 - t0)
        worker = (w1 - w0) / dt if w0 is not None and w1 is not None else None
        return (p1 - p0) / dt, (v1 - v0) / dt, worker


def waiting_for_vectors(obs: Observer, prod: LiveProducer) -> int:
    """Events delivered to the click topic whose vector this run has not read yet, and
    malformed messages not yet dead-lettered: what a drain would wait for."""
    with prod.lock:
        delivered, bad = prod.delivered, prod.delivered_bad
    with obs.lock:
        vectors, dead = obs.counts["out"], obs.counts["dlq"]
    return max(0, delivered - vectors) + max(0, bad - dead)
