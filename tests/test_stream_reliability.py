"""Reliability of the worker on the real broker: inputs no producer can dead-letter as
they are (an oversized message), and the dead letter's size bound."""

from __future__ import annotations

import hashlib
import os
import time

import pytest
import stream_util as su

from clickvec.bundle.reader import load_bundle
from clickvec.contract.messages import DEAD_LETTER_MAX_BYTES, DeadLetter
from clickvec.devtools.produce import produce_records
from clickvec.devtools.synth import SynthConfig, generate_events


def test_dead_letter_of_a_large_value_is_truncated_with_size_and_hash():
    value = os.urandom(900_000)
    d = DeadLetter("not_json", "Expecting value", "clicks", 1, 7, b"k" * 20_000, value)
    data = d.to_bytes()
    assert len(data) <= DEAD_LETTER_MAX_BYTES
    back = DeadLetter.from_bytes(data)
    assert back.truncated and back.value_size == 900_000 and back.key_size == 20_000
    assert back.value_sha256 == hashlib.sha256(value).hexdigest()
    assert back.key_sha256 == hashlib.sha256(b"k" * 20_000).hexdigest()
    assert back.value and value.startswith(back.value) and len(back.value) > 600_000
    assert back.key is not None and (b"k" * 20_000).startswith(back.key)
    assert (back.topic, back.partition, back.offset, back.reason) == ("clicks", 1, 7, "not_json")
    # A letter that fits is written as before: no truncation fields.
    small = DeadLetter("not_json", "x", "clicks", 0, 1, b"u", b"v" * 1000)
    assert b"truncated" not in small.to_bytes() and DeadLetter.from_bytes(small.to_bytes()) == small


def checked_outputs(w: su.WorkerProcess, rc: int | None, reader: su.TopicReader, dead_reader: su.TopicReader,
                    bundle, events) -> list[DeadLetter]:
    """After the worker stopped with `rc` (it must be 0): every user's vectors equal the
    offline encoder's; returns the dead letters read."""
    assert rc == 0, w.log_tail()
    su.check_vectors(bundle, events, su.VectorLog.of(reader.messages))
    return su.read_dead_letters(dead_reader.messages)


def _topic(admin, name: str, partitions: int, config: dict[str, str] | None = None) -> str:
    from confluent_kafka.admin import NewTopic

    admin.create_topics([NewTopic(name, num_partitions=partitions, config=config or {})])[name].result(30)
    return name


@pytest.mark.broker
@pytest.mark.slow
def test_oversized_message_is_dead_lettered_and_the_worker_goes_on(kafka_bootstrap, new_topic, new_group,
                                                                  stream_bundle_path, tmp_path):
    """A ~900 KB message (under the input topic's max.message.bytes) between valid events:
    dead-lettered with its offset, a prefix, its size and hash; every user exact."""
    import uuid

    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    src = _topic(admin, f"big-{uuid.uuid4().hex}", 2, {"max.message.bytes": "2000000"})
    out, dlq = new_topic(2, "vectors"), new_topic(2, "dlq")
    events = generate_events(SynthConfig(n_users=40, seed=21, mean_events=15))[:400]
    big = os.urandom(900_000)
    records = [(e.user_id.encode(), e.to_bytes()) for e in events]
    records.insert(200, (b"big-key", big))
    assert produce_records(records, kafka_bootstrap, src, extra_config={"message.max.bytes": 2_000_000,
                                                                      "compression.type": "none"}) == 401
    bundle = load_bundle(stream_bundle_path, providers="cpu")
    w = su.WorkerProcess(kafka_bootstrap, stream_bundle_path, src, out, dlq, new_group(), tmp_path / "s",
                      tmp_path / "w.log").start()
    reader, dead_reader = su.TopicReader(kafka_bootstrap, out), su.TopicReader(kafka_bootstrap, dlq)
    try:
        su.wait_for(dead_reader, lambda m: len(m) >= 1, 120, [w])
        su.wait_for(reader, lambda m: su.VectorLog.of(m).distinct() >= len(events), 120, [w])
        reader.poll(1.0)
        assert w.alive(), "the worker stopped on the oversized message"
    finally:
        rc = w.stop()
        reader.close()
        dead_reader.close()
    dead = checked_outputs(w, rc, reader, dead_reader, bundle, events)
    assert len(dead) == 1
    d = dead[0]
    assert d.truncated and d.value_size == len(big) and d.value_sha256 == hashlib.sha256(big).hexdigest()
    assert d.value and big.startswith(d.value) and d.key == b"big-key"
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": new_group()})
    c.assign([TopicPartition(src, d.partition, d.offset)])
    m = c.consume(1, timeout=10)[0]
    c.close()
    assert m.value() == big  # the letter's offset points at the oversized message


def test_retriable_errors_are_retried_for_a_bounded_time():
    from confluent_kafka import KafkaError, KafkaException

    from clickvec.stream.worker.continuity import GapError, retrying

    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise KafkaException(KafkaError(KafkaError.NOT_COORDINATOR))
        return "ok"

    assert retrying(flaky, "committed", timeout=5.0, first_wait=0.01) == "ok" and len(calls) == 3

    def never() -> str:
        raise KafkaException(KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS))

    t0 = time.monotonic()
    with pytest.raises(GapError, match="committed"):
        retrying(never, "committed", timeout=0.5, first_wait=0.05)
    assert time.monotonic() - t0 < 2.0

    def denied() -> str:
        raise KafkaException(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED))

    t0 = time.monotonic()
    with pytest.raises(GapError):
        retrying(denied, "committed", timeout=30.0)
    assert time.monotonic() - t0 < 1.0  # not retriable: at once


def test_gaps_the_consumer_skipped_over_are_no_holes():
    """A read_committed consumer skips transaction markers and aborted records: a gap
    right after the record applied last, between two records the consumer returned one
    after the other (FetchChain), is passed, not read back."""
    from clickvec.stream.worker.continuity import find_holes
    from clickvec.stream.worker.engine import Record
    from clickvec.stream.worker.faust_internals import FetchChain

    chain, skips = FetchChain(), {}
    chain.link(1, 0, [10, 11, 13], skips)  # 12: a commit marker
    chain.link(1, 0, [20, 21], skips)  # 14..19: an aborted transaction and its marker
    assert skips == {(0, 13): 11, (0, 20): 13}
    recs = [Record(b"k", b"v", "t", 0, o) for o in (10, 11, 13, 20, 21)]
    passed: list[tuple[int, int, int]] = []
    expected = {0: 10}
    assert find_holes(recs, expected, skips, passed) == [] and expected == {0: 22}
    assert passed == [(0, 12, 13), (0, 14, 20)]
    # Records the worker never applied (expected lower than the chain's record before):
    # a hole, read back.
    assert find_holes(recs[2:], {0: 12}, skips, []) == []
    assert find_holes(recs[3:], {0: 12}, skips, []) == [(0, 0, 12)]
    # After a drop the chain starts again: the next gap is read back.
    chain.broken()
    skips2: dict[tuple[int, int], int] = {}
    chain.link(1, 0, [30], skips2)
    assert skips2 == {}
    chain.link(2, 0, [31, 33], skips2)  # a new generation starts a new chain too
    assert skips2 == {(0, 33): 31}
