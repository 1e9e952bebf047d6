"""A worker group's footprint on Kafka, written from outside the worker: its state
changelog (the topic, key, value and partition Faust's table writes and recovers from,
stream/worker/table.py) and its committed input offsets (where Faust's consumer resumes).

A worker started on a fresh state dir recovers every state from the changelog, then
consumes from the committed offsets; the states written here carry the partition and
offset of the user's last event, so any record at or below it is skipped as a replay
(stream/worker/engine.py) and none after it is missed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from clickvec.errors import ClickvecError
from clickvec.kafka import KafkaConnection, produce_waiting

log = logging.getLogger(__name__)
_COORDINATOR_MOVING = (KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                       KafkaError.COORDINATOR_NOT_AVAILABLE)

TABLE_NAME = "user-state"  # stream/worker/table.py TABLE_NAME (not imported: that pulls in Faust)


class GroupStateError(ClickvecError):
    """The worker group already has state, or it could not be written. Action: choose a
    new --group (or --force to overwrite), and check the brokers; the message says which."""


def changelog_topic(group: str) -> str:
    """Faust's name for the table's changelog: `<app id>-<table>-changelog`."""
    return f"{group}-{TABLE_NAME}-changelog"


def committed_offsets(conf: dict[str, Any], group: str, topic: str, partitions: Iterable[int],
                      timeout: float = 30.0) -> dict[int, int]:
    """partition -> the group's committed offset on `topic` (partitions without one left out)."""
    tps = [TopicPartition(topic, p) for p in partitions]
    deadline = time.monotonic() + timeout
    c = Consumer({**conf, "group.id": group, "enable.auto.commit": False})
    try:
        while True:
            try:
                got = c.committed(tps, timeout=max(1.0, deadline - time.monotonic()))
                break
            except KafkaException as e:
                # A group coordinator that just moved or is still loading answers
                # NOT_COORDINATOR / COORDINATOR_LOAD_IN_PROGRESS: ask again, as the consumer does.
                if e.args[0].code() not in _COORDINATOR_MOVING or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        c.close()
    return {tp.partition: tp.offset for tp in got if tp.offset >= 0}


def commit_offsets(conf: dict[str, Any], group: str, topic: str, offsets: dict[int, int],
                   timeout: float = 30.0) -> None:
    """Commit `offsets` (partition -> next offset to consume) as `group`'s, without joining
    the group (an offset commit of a group with no live members)."""
    c = Consumer({**conf, "group.id": group, "enable.auto.commit": False})
    try:
        tps = [TopicPartition(topic, p, o) for p, o in sorted(offsets.items())]
        for tp in c.commit(offsets=tps, asynchronous=False) or []:
            if tp.error is not None:
                raise GroupStateError(f"commit of {topic}[{tp.partition}] for group {group!r}: {tp.error}")
    except KafkaException as e:
        raise GroupStateError(f"could not commit offsets for group {group!r}: {e}") from None
    finally:
        c.close()


def topic_records(conf: dict[str, Any], topic: str, timeout: float = 30.0) -> int | None:
    """Records retained in `topic` (sum of high - low), None when it does not exist."""
    c = Consumer({**conf, "group.id": "clickvec-lifecycle-probe", "enable.auto.commit": False})
    try:
        md = c.list_topics(topic, timeout=timeout).topics.get(topic)
        if md is None or md.error is not None:
            return None
        total = 0
        for p in md.partitions:
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            total += max(0, high - low)
        return total
    finally:
        c.close()


def check_fresh(conf: dict[str, Any], group: str, in_topic: str, partitions: Iterable[int]) -> None:
    """GroupStateError unless the group has no committed offsets on the input topic and its
    changelog holds nothing: a rebuild must not be mixed into a live group's state."""
    have = committed_offsets(conf, group, in_topic, partitions)
    if have:
        raise GroupStateError(f"group {group!r} already has committed offsets on {in_topic!r} ({have}); "
                              "use a new --group, or --force to overwrite them")
    n = topic_records(conf, changelog_topic(group))
    if n:
        raise GroupStateError(f"the state changelog {changelog_topic(group)!r} already holds {n} records; "
                              "use a new --group, or --force to write over it")


def ensure_changelog(conn: KafkaConnection, group: str, partitions: int, replicas: int) -> str:
    """The changelog topic as Faust declares it: compacted, one partition per input partition."""
    name = changelog_topic(group)
    conn.ensure_topic(name, partitions, replication_factor=replicas, config={"cleanup.policy": "compact"})
    return name


class Publisher:
    """Records to topics through one reliable producer; `flush` raises unless every one
    was acknowledged. Vectors go by key (murmur2, as the worker's sink); changelog
    records to an explicit partition."""

    def __init__(self, conf: dict[str, Any]) -> None:
        from clickvec.stream.worker.sink import reliable_producer

        self.producer = reliable_producer(conf, partitioner="murmur2_random")
        self.errors: list[str] = []
        self.sent = 0

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None and len(self.errors) < 10:
            self.errors.append(f"{msg.topic()}[{msg.partition()}]: {err}")

    def send(self, topic: str, key: bytes, value: bytes | None, partition: int | None = None) -> None:
        produce_waiting(self.producer, topic, key, value, self._on_delivery, partition=partition)
        self.sent += 1

    def flush(self, timeout: float = 120.0) -> None:
        left = self.producer.flush(timeout)
        if left or self.errors:
            raise GroupStateError(f"{left} records not delivered within {timeout:.0f}s; errors: {self.errors[:3]}")
