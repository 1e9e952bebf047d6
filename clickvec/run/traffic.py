"""The live traffic of `clickvec run`: the event file replayed into the click topic."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clickvec.kafka import produce_waiting

log = logging.getLogger(__name__)

BAD_KEY = b"bad-client"
# Malformed messages mixed into the live traffic so the dead-letter path shows.
MALFORMED: tuple[bytes, ...] = (
    b"this is not json",
    b"",
    b'{"user_id":"u-bad","event_type":"view","ts":1767225600000}',  # missing item_id
    b'{"user_id":"u-bad","item_id":"i1","event_type":"view","ts":12}',  # ts out of range
    b'{"user_id":"u-bad","item_id":"i1","event_type":"payment","ts":1767225600000,"amount":-5}',
    b'["an","array"]',
)


def base_user(u: str) -> str:
    """The data's user id of a replayed user (`u00012~2` -> `u00012`)."""
    return u.split("~", 1)[0]


class LiveProducer(threading.Thread):
    """Replays the event file into the click topic at `rate`, in event-time order.
    Each pass after the first renames the users (`u00012~2`), so every pass starts
    fresh states and the counts stay one vector per event. Records each delivered
    event's CreateTime by partition and offset, for the latency measurement."""

    def __init__(self, conf: dict[str, Any], topic: str, events: Path, rate: float, malformed_every: int) -> None:
        super().__init__(name="live-producer", daemon=True)
        from clickvec.eventfile import read_table

        t = read_table(events)
        self.cols = [t.column(n).to_pylist() for n in
                     ("user_id", "item_id", "event_type", "ts", "category", "amount", "session_id")]
        self.n_events = t.num_rows
        self.conf = conf
        self.topic = topic
        self.rate = rate
        self.malformed_every = malformed_every
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.sent = 0
        self.delivered = 0  # valid events acknowledged
        self.delivered_bad = 0  # malformed messages acknowledged
        self.failed = 0
        self.errors: list[str] = []
        self.passes = 0
        self.create_ts: dict[tuple[int, int], int] = {}  # (partition, offset) -> CreateTime ms

    def records(self) -> Iterator[tuple[bytes, bytes]]:
        n = 0
        p = 0
        while True:
            p += 1
            self.passes = p
            sfx = "" if p == 1 else f"~{p}"
            for u, item, et, ts, cat, amount, sess in zip(*self.cols, strict=True):
                uid = u + sfx
                d: dict[str, Any] = {"user_id": uid, "item_id": item, "event_type": et, "ts": ts}
                if cat is not None:
                    d["category"] = cat
                if amount is not None:
                    d["amount"] = amount
                if sess is not None:
                    d["session_id"] = sess + sfx
                yield uid.encode(), json.dumps(d, separators=(",", ":")).encode()
                n += 1
                if self.malformed_every and n % self.malformed_every == 0:
                    yield BAD_KEY, MALFORMED[(n // self.malformed_every - 1) % len(MALFORMED)]

    def on_delivery(self, err: Any, msg: Any) -> None:
        with self.lock:
            if err is not None:
                self.failed += 1
                if len(self.errors) < 5:
                    self.errors.append(str(err))
            elif msg.key() == BAD_KEY:
                self.delivered_bad += 1
            else:
                self.delivered += 1
                self.create_ts[(msg.partition(), msg.offset())] = msg.timestamp()[1]

    def run(self) -> None:
        from confluent_kafka import Producer

        from clickvec.devtools.produce import TokenBucket

        producer = Producer({**self.conf, "linger.ms": 5, "enable.idempotence": True,
                             "compression.type": "lz4", "queue.buffering.max.messages": 200_000})
        bucket = TokenBucket(self.rate)
        try:
            for key, value in self.records():
                if self.stop_event.is_set():
                    break
                bucket.take()
                produce_waiting(producer, self.topic, key, value, self.on_delivery)
                self.sent += 1
                producer.poll(0)
        finally:
            left = producer.flush(30)
            if left:
                log.warning("%d messages still queued after 30 s", left)

    def stop(self) -> None:
        self.stop_event.set()
