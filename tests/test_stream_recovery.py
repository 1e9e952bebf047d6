"""The worker's bulk restore (stream/worker/restore.py) against Faust's own recovery
path, on the real broker and real RocksDB: the same databases, tombstones included."""

from __future__ import annotations

import asyncio
import time
import uuid
from types import SimpleNamespace

import pytest

from clickvec.stream.worker.restore import ChangelogRestorer

PARTITIONS = 3


def _fill(bootstrap: str, topic: str) -> None:
    """Users written several times; some forgotten (a tombstone), some of those written
    again; an aborted transaction (must not be applied) and a committed one last, so
    each partition ends with a commit marker."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for round_ in range(3):
        for i in range(300):
            p.produce(topic, f"v{round_}-{i}".encode() * 20, f"u{i:04d}".encode(), partition=i % PARTITIONS)
    for i in range(0, 300, 7):  # forgotten
        p.produce(topic, None, f"u{i:04d}".encode(), partition=i % PARTITIONS)
    for i in range(0, 300, 21):  # forgotten, then back
        p.produce(topic, b"back", f"u{i:04d}".encode(), partition=i % PARTITIONS)
    p.flush(30)
    tx = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"t-{uuid.uuid4().hex}"})
    tx.init_transactions(30)
    for commit in (False, True):
        tx.begin_transaction()
        for i in range(1, 300, 5):
            tx.produce(topic, b"aborted" if not commit else None, f"u{i:04d}".encode(), partition=i % PARTITIONS)
        tx.commit_transaction(30) if commit else tx.abort_transaction(30)


def _faust_store(tmp_path, name: str):
    """A Faust RocksDB table store (the worker's kind), not attached to any broker."""
    import faust

    app = faust.App(f"rec-{uuid.uuid4().hex[:8]}", store="rocksdb://", datadir=str(tmp_path / name))
    table = app.Table("user-state", default=None, partitions=PARTITIONS, key_type=bytes, value_type=bytes)
    return table.data


def _faust_apply(bootstrap: str, topic: str, store) -> None:
    """Faust's recovery path: the records a read_committed consumer returns, through
    `Store.apply_changelog_batch` in buffers of 1,000 (the table's recovery buffer)."""
    from confluent_kafka import Consumer, TopicPartition
    from faust.types.tuples import Message

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "isolation.level": "read_committed",
                  "enable.partition.eof": True})
    c.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    events, eof = [], set()
    while len(eof) < PARTITIONS:
        for m in c.consume(1000, 1.0):
            if m.error():
                eof.add(m.partition())
                continue
            events.append(SimpleNamespace(message=Message(topic, m.partition(), m.offset(), 0, 0, None, m.key(),
                                                          m.value(), None)))
    c.close()
    for i in range(0, len(events), 1000):
        store.apply_changelog_batch(events[i:i + 1000], None, None)


def _contents(store, partition: int) -> dict[bytes, bytes]:
    """The partition's keys and values, without Faust's offset key (compared on its own)."""
    db = store._db_for_partition(partition)  # noqa: SLF001 - the test reads Faust's databases
    return {k: v for k, v in db.items() if k != store.offset_key}


def _spans(bootstrap: str, topic: str, start: dict[int, int]) -> dict[int, tuple[int, int]]:
    """Per partition (first offset to read, last offset), as Faust's recovery passes them."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex})
    hw = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(PARTITIONS)}
    c.close()
    return {p: (start.get(p, 0), hw[p] - 1) for p in range(PARTITIONS)}


@pytest.mark.broker
def test_bulk_restore_gives_faust_recovery_databases_tombstones_included(kafka_bootstrap, new_topic, tmp_path):
    topic = new_topic(PARTITIONS, "changelog")
    _fill(kafka_bootstrap, topic)
    faust_store, fast_store = _faust_store(tmp_path, "faust"), _faust_store(tmp_path, "fast")
    _faust_apply(kafka_bootstrap, topic, faust_store)
    db_for = fast_store._db_for_partition  # noqa: SLF001 - as faust_internals.db_for_partition
    key = fast_store.offset_key

    # First a restore stopped by a "rebalance" after its first chunk: the databases hold
    # a prefix of the changelog and its offset, whatever the stop.
    calls = []

    def once() -> bool:
        calls.append(1)
        return len(calls) == 1

    restorer = ChangelogRestorer({"bootstrap.servers": kafka_bootstrap}, topic, key, chunk=250)
    spans = _spans(kafka_bootstrap, topic, {})
    part = asyncio.run(restorer.restore(spans, db_for, once, time.monotonic() + 60))
    assert not part.complete and 0 < part.records <= 250
    for p, off in part.applied.items():
        assert int(db_for(p)[key]) == off < spans[p][1]
    assert len(part.applied) < PARTITIONS or sum(len(_contents(fast_store, p)) for p in range(PARTITIONS)) < 900

    # Then the rest, from the persisted offsets, as Faust's recovery would start it.
    persisted = {p: int(db_for(p)[key]) + 1 for p in range(PARTITIONS) if db_for(p).get(key) is not None}
    rest = asyncio.run(restorer.restore(_spans(kafka_bootstrap, topic, persisted), db_for, lambda: True,
                                        time.monotonic() + 60))
    assert rest.complete
    for p in range(PARTITIONS):
        want, got = _contents(faust_store, p), _contents(fast_store, p)
        assert got.keys() == want.keys(), f"partition {p}: {sorted(got.keys() ^ want.keys())[:5]}"
        assert got == want
    everything = {k: v for p in range(PARTITIONS) for k, v in _contents(fast_store, p).items()}
    assert b"u0007" not in everything and b"u0014" not in everything  # forgotten stay gone
    assert everything[b"u0042"] == b"back" and everything[b"u0000"] == b"back"
    assert b"u0001" not in everything and everything[b"u0002"] == b"v2-2" * 20  # the committed tombstones
    assert b"aborted" not in everything.values()
    # Faust's store persists the offset of each partition's last record; the restore
    # read through the commit marker after it, and persists that offset, so that Faust's
    # recovery finds nothing left to read.
    for p in range(PARTITIONS):
        assert int(db_for(p)[key]) == spans[p][1] == int(faust_store._db_for_partition(p)[key]) + 1  # noqa: SLF001
