"""Output side of the worker: vectors, dead letters and the latest vectors through one
confluent-kafka producer; each batch is acknowledged by the brokers before its states
are written.

A None value is a tombstone (a Kafka message with a null value): on the vector topic and
the latest-vector topic it says the user was forgotten or expired (engine.py)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from typing import Any

from confluent_kafka import KafkaError, Producer

from clickvec.errors import ClickvecError
from clickvec.kafka import produce_waiting

log = logging.getLogger(__name__)

QUEUE_MESSAGES = 1_000_000  # the producer's queue.buffering.max.messages
QUEUE_ROOM = QUEUE_MESSAGES * 9 // 10  # a batch goes in one call while the queue holds fewer than this


class DeliveryError(ClickvecError):
    """The output topic did not accept a message. The worker stops without storing the
    batch's states, so the events are processed again after a restart. Action: check
    the brokers and the topic's ACLs."""


def reliable_producer(conf: dict[str, Any], **extra: Any) -> Producer:
    """The worker's producer settings: idempotent, acks from all replicas, batched."""
    return Producer({
        **conf,
        "linger.ms": 2,
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": "lz4",
        "batch.num.messages": 10000,
        "queue.buffering.max.messages": QUEUE_MESSAGES,
        **extra,
    })


class Sink:
    """`latest_topic` (optional, compacted): each user's last vector of each batch, in
    the vector topic's encoding, so that the topic read with "last value per key" is
    every user's current vector."""

    def __init__(self, conf: dict[str, Any], out_topic: str, dlq_topic: str, latest_topic: str = "") -> None:
        self.out_topic = out_topic
        self.dlq_topic = dlq_topic
        self.latest_topic = latest_topic
        # Same key -> partition mapping as Kafka's Java clients and Faust.
        self.producer = reliable_producer(conf, partitioner="murmur2_random")
        self._poller: threading.Thread | None = None
        self._stopping = threading.Event()

    def send(self, outputs: list[tuple[bytes, bytes | None]], dead: list[tuple[bytes | None, bytes, str]],
             loop: asyncio.AbstractEventLoop, latest: dict[bytes, bytes | None] | None = None
             ) -> asyncio.Future[None]:
        """Send one batch; the future resolves when every message of it is acknowledged
        (DeliveryError if any failed), independently of batches sent after it. `latest`
        goes to the latest-vector topic when there is one."""
        fut: asyncio.Future[None] = loop.create_future()
        latest = latest if self.latest_topic and latest else {}
        total = len(outputs) + len(dead) + len(latest)
        if total == 0:
            fut.set_result(None)
            return fut
        errors: list[str] = []
        acked = itertools.count(1)  # next() is atomic: reports may be served from two threads

        def settle() -> None:
            if not fut.done():
                if errors:
                    fut.set_exception(DeliveryError(f"{len(errors)} messages failed: {errors[:3]}"))
                else:
                    fut.set_result(None)

        def on_delivery(err: KafkaError | None, msg: Any) -> None:
            if err is not None:
                errors.append(f"{msg.topic()}: {err}")
            if next(acked) == total:
                loop.call_soon_threadsafe(settle)

        self._produce_many(self.out_topic, outputs, on_delivery)
        for key, value, _ in dead:
            produce_waiting(self.producer, self.dlq_topic, key, value, on_delivery)
        self._produce_many(self.latest_topic, list(latest.items()), on_delivery)
        self._ensure_poller()
        return fut

    def _produce_many(self, topic: str, messages: list[tuple[bytes, bytes | None]], on_delivery: Any) -> None:
        """Queue `messages` in their order, in one call (`produce_batch`) when the
        producer's queue has room for them, else one by one, waiting for room."""
        if not messages:
            return
        producer = self.producer
        if len(producer) + len(messages) > QUEUE_ROOM:
            for key, value in messages:
                produce_waiting(producer, topic, key, value, on_delivery)
            return
        batch = [{"key": key, "value": value} for key, value in messages]
        if producer.produce_batch(topic, batch, on_delivery=on_delivery) == len(batch):
            return
        # Refused messages (`_error` set): queued again in order when they are the tail
        # of the batch (the queue filled up: wait for room); one refused before an
        # accepted one cannot be queued again without reordering the user's vectors,
        # so the batch fails and, with the process, is processed again from its events.
        first = next(k for k, m in enumerate(batch) if "_error" in m)
        if any("_error" not in m for m in batch[first:]):
            raise DeliveryError(f"{topic}: the producer refused messages of a batch: {batch[first]['_error']}")
        for m in batch[first:]:
            produce_waiting(producer, topic, m["key"], m["value"], on_delivery)

    def _ensure_poller(self) -> None:
        """A thread serving delivery reports as they come (`send`)."""
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll_loop, name="clickvec-sink-poll", daemon=True)
            self._poller.start()

    def _poll_loop(self) -> None:
        while not self._stopping.is_set():
            self.producer.poll(0.05)

    def close(self) -> None:
        self._stopping.set()
        if self._poller is not None:
            self._poller.join(5)
        self.producer.flush(10)
