"""Helpers for tests that talk to the real broker (see conftest.py)."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, KafkaException, Message

from clickvec.kafka import PARTITION_EOF


def consume_all(bootstrap: str, topic: str, expected: int, timeout: float = 60) -> list[Message]:
    """Read `topic` from the earliest offset with a fresh consumer group until
    `expected` messages arrived or `timeout` seconds passed; return what arrived
    (callers assert the count, so a short read shows how short it was)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-read-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "isolation.level": "read_committed",
        }
    )
    out: list[Message] = []
    try:
        c.subscribe([topic])
        deadline = time.monotonic() + timeout
        while len(out) < expected and time.monotonic() < deadline:
            for m in c.consume(num_messages=min(10_000, expected - len(out)), timeout=0.5):
                err = m.error()
                if err is None:
                    out.append(m)
                elif err.code() != PARTITION_EOF:
                    raise KafkaException(err)
    finally:
        c.close()
    return out
