"""Output side of the worker: vectors and dead letters through one confluent-kafka
producer, delivered (flushed) before the batch's states are written."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from confluent_kafka import KafkaError, Producer

from clickvec.contract import ClickvecError
from clickvec.kafkaconf import produce_waiting

log = logging.getLogger(__name__)


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
        "queue.buffering.max.messages": 1_000_000,
        **extra,
    })


class Sink:
    def __init__(self, conf: dict[str, Any], out_topic: str, dlq_topic: str) -> None:
        self.out_topic = out_topic
        self.dlq_topic = dlq_topic
        # Same key -> partition mapping as Kafka's Java clients and Faust.
        self.producer = reliable_producer(conf, partitioner="murmur2_random")
        self._errors: list[str] = []

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err}")

    def send(self, outputs: list[tuple[bytes, bytes]], dead: list[tuple[bytes | None, bytes, str]]) -> None:
        for key, value in outputs:
            produce_waiting(self.producer, self.out_topic, key, value, self._on_delivery)
        for key, value, _ in dead:
            produce_waiting(self.producer, self.dlq_topic, key, value, self._on_delivery)
        self.producer.poll(0)

    async def deliver(self, timeout: float = 30.0) -> None:
        """Wait until every message sent so far is acknowledged by the brokers."""
        loop = asyncio.get_running_loop()
        remaining = await loop.run_in_executor(None, self.producer.flush, timeout)
        if remaining:
            raise DeliveryError(f"{remaining} messages not delivered within {timeout}s")
        if self._errors:
            errs, self._errors = self._errors, []
            raise DeliveryError(f"{len(errs)} messages failed: {errs[:3]}")

    def close(self) -> None:
        self.producer.flush(10)
