"""Prometheus metrics of the worker (served at /metrics by the Faust web server)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        self.latency = Histogram("clickvec_end_to_end_seconds",
                                 "event time to vector delivered", buckets=_LAT_BUCKETS, registry=r)
        self.lag = Gauge("clickvec_consumer_lag", "messages behind the high watermark", ["partition"], registry=r)
        self.users = Gauge("clickvec_users_in_batch", "distinct users in the last batch", registry=r)
        self.users_in_state = Gauge("clickvec_users_in_state",
                                    "users whose state this worker holds (its active partitions)", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
