"""Prometheus metrics of the worker (served at /metrics by the Faust web server)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

_LAT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.events_in = Counter("clickvec_events_in", "messages consumed from the click topic", registry=r)
        self.events_applied = Counter("clickvec_events_applied", "events applied to user state", registry=r)
        self.vectors_out = Counter("clickvec_vectors_out", "vector messages published", registry=r)
        self.replayed = Counter("clickvec_events_skipped_replay",
                                "events skipped because the state already holds them", registry=r)
        self.gap_filled = Counter("clickvec_events_gap_filled",
                                  "events the consumer skipped over, read back from the brokers", registry=r)
        self.dead = Counter("clickvec_events_dead_lettered", "messages sent to the dead-letter topic",
                            ["reason"], registry=r)
        self.state_resets = Counter("clickvec_state_resets", "user states reset for a new model", registry=r)
        self.batch_size = Histogram("clickvec_batch_size", "messages per micro-batch",
                                    buckets=(1, 8, 32, 128, 512, 1024, 2048, 4096, 8192), registry=r)
        self.infer_seconds = Histogram("clickvec_inference_seconds", "ONNX Runtime time per batch",
                                       buckets=_LAT_BUCKETS, registry=r)
        self.batch_seconds = Histogram("clickvec_batch_seconds", "wall time per batch, delivery included",
                                       buckets=_LAT_BUCKETS, registry=r)
        self.latency = ArrayHistogram("clickvec_end_to_end_seconds", "event time to vector delivered",
                                      _LAT_BUCKETS, r)
        self.lag = Gauge("clickvec_consumer_lag", "messages behind the high watermark", ["partition"], registry=r)
        self.users = Gauge("clickvec_users_in_batch", "distinct users in the last batch", registry=r)
        self.users_in_state = Gauge("clickvec_users_in_state",
                                    "users whose state this worker holds (its active partitions)", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ArrayHistogram:
    """A Prometheus histogram observed a whole array at a time: the end-to-end latency
    has one value per event, and `Histogram.observe` per value cost a visible share of
    the worker's CPU (benchmarks/README.md, round 4). Exposed as Histogram exposes it
    (`_bucket` with `le`, `_count`, `_sum`)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = np.asarray(buckets, np.float64)
        self.counts = np.zeros(len(buckets) + 1, np.int64)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self._lock = threading.Lock()  # collect runs in the web server's thread
        registry.register(self)

    def observe_many(self, values: np.ndarray) -> None:
        # A value goes to the first bucket whose bound is >= it, as in Histogram.
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=len(self.counts))
        total = float(np.sum(values))
        with self._lock:
            self.counts += counts
            self.sum += total

    def observe(self, value: float) -> None:
        self.observe_many(np.asarray([value], np.float64))

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            cum = np.cumsum(self.counts).tolist()
            total = self.sum
        buckets = [(floatToGoString(b), c) for b, c in zip(self.bounds.tolist(), cum, strict=False)]
        buckets.append(("+Inf", cum[-1]))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)
