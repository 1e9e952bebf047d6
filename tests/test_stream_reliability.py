"""Reliability of the worker on the real broker: inputs no producer can dead-letter as
they are (an oversized message), and the dead letter's size bound."""

from __future__ import annotations

import hashlib
import os

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
