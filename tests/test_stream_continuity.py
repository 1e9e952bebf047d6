"""Offset continuity: holes the consumer skipped over are found and read back from the
real broker, in offset order, before the batch is applied."""

from __future__ import annotations

import asyncio

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from clickvec.devtools.produce import produce_records
from clickvec.stream.worker.continuity import Continuity, find_holes, low_watermark, retrying
from clickvec.stream.worker.engine import Record


def _rec(p: int, o: int) -> Record:
    return Record(b"k", b"v", "t", p, o)


def test_find_holes_per_partition_and_mid_batch():
    expected = {0: 10, 1: 5}
    recs = [_rec(0, 10), _rec(1, 7), _rec(0, 11), _rec(0, 15), _rec(0, 16), _rec(2, 40), _rec(2, 41)]
    assert find_holes(recs, expected) == [(1, 1, 5), (3, 0, 12)]
    assert expected == {0: 17, 1: 8, 2: 42}


def test_find_holes_ignores_replays_below_expected():
    expected = {0: 100}
    recs = [_rec(0, 90), _rec(0, 100), _rec(0, 95), _rec(0, 101)]
    assert find_holes(recs, expected) == []
    assert expected == {0: 102}


@pytest.mark.broker
def test_unknown_partition_asks_for_the_topics_metadata_before_the_retry():
    """A client that only queries offsets keeps a cached view without the partition after a
    leader moved (librdkafka refreshes only topics a client consumes or produces): the low
    watermark query asks for the topic's metadata before `retrying` tries again. A stand-in
    client for this one function; tests/test_stream_cluster.py runs the real case."""

    class Client:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def get_watermark_offsets(self, tp: TopicPartition, timeout: float) -> tuple[int, int]:
            self.calls.append("watermarks")
            if "metadata" not in self.calls:
                raise KafkaException(KafkaError(-190))
            return 7, 9

        def list_topics(self, topic: str, timeout: float) -> None:
            self.calls.append("metadata")

    c = Client()
    assert retrying(lambda: low_watermark(c, "clicks", 1, 5.0), "low watermark", 5, first_wait=0.01) == 7
    assert c.calls == ["watermarks", "metadata", "watermarks"]


def test_holes_are_read_back_from_the_broker(kafka_bootstrap, new_topic, new_group):
    topic = new_topic(2, "cont")
    msgs = [(f"u{i % 50}".encode(), f"v{i}".encode()) for i in range(400)]
    assert produce_records(msgs, kafka_bootstrap, topic) == 400
    # What the broker holds, per partition, in offset order.
    reader = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": new_group(), "auto.offset.reset": "earliest",
                       "enable.auto.commit": False})
    reader.assign([TopicPartition(topic, 0, 0), TopicPartition(topic, 1, 0)])
    log: dict[int, list[Record]] = {0: [], 1: []}
    while sum(len(v) for v in log.values()) < 400:
        for m in reader.consume(500, timeout=1.0):
            assert m.error() is None
            log[m.partition()].append(Record(m.key(), m.value(), topic, m.partition(), m.offset()))
    group = new_group()
    # The group committed offset 20 on partition 0 and nothing on partition 1.
    committer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
    # A fresh broker's group coordinator may not be ready yet (NOT_COORDINATOR): retried.
    retrying(lambda: committer.commit(offsets=[TopicPartition(topic, 0, 20)], asynchronous=False), "commit", 30)
    committer.close()
    reader.close()

    p0, p1 = log[0], log[1]
    assert len(p0) > 60 and len(p1) > 60
    # Delivered: p0 30..39 (20..29 never came), p1 0..9 then 15..19 (10..14 skipped over).
    batch = p0[30:40] + p1[0:10] + p1[15:20]
    filled_ranges: list[tuple[int, int, int]] = []

    async def on_filled(p: int, start: int, end: int) -> None:
        filled_ranges.append((p, start, end))

    cont = Continuity({"bootstrap.servers": kafka_bootstrap}, topic, group, on_filled=on_filled, timeout=30)
    try:
        out = asyncio.run(cont.complete(batch, generation=1))
        # The next batch of the same generation continues where this one ended.
        out2 = asyncio.run(cont.complete(p0[42:44], generation=1))
        # A hole at the end of a partition: consumed up to 50, applied up to 44.
        out3 = asyncio.run(cont.tail({0: 50, 1: 20}, generation=1))
    finally:
        cont.close()

    def key(rs):
        return [(r.partition, r.offset, r.value) for r in rs]

    assert key(out) == key(p0[20:40] + p1[0:20])
    assert filled_ranges[:2] == [(0, 20, 30), (1, 10, 15)]
    assert key(out2) == key(p0[40:44])
    assert key(out3) == key(p0[44:50])
    assert filled_ranges[2:] == [(0, 40, 42), (0, 44, 50)]
    assert cont.filled == 10 + 5 + 2 + 6
