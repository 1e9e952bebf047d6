"""The Faust table's storage as the engine's `StateStore`: RocksDB for the states, a
Kafka changelog for recovery."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

from confluent_kafka import KafkaError
from faust.types import TP
from rocksdict import WriteBatch

from clickvec.kafka import produce_waiting
from clickvec.stream.worker import faust_internals
from clickvec.stream.worker.restore import ChangelogRestorer
from clickvec.stream.worker.sink import DeliveryError, reliable_producer
from clickvec.stream.worker.state import last_ts_of
from clickvec.stream.worker.store import Record, StateStore

log = logging.getLogger(__name__)

TABLE_NAME = "user-state"


class TableStore(StateStore):
    """The Faust table's RocksDB databases as a `StateStore`; a user's state lives in
    the database of its input partition, as Faust's store keeps it (the partition of the
    current event).

    Reads and writes go straight to the partition's database (rocksdict, raw bytes, the
    keys and values Faust's store would hold); a batch's states are written as one
    `WriteBatch` per partition, as Faust applies changelog batches in recovery. Through
    Faust's `table[k] = v`, each state would be a separate RocksDB write with its own
    WAL append, a cost the worker's event loop pays per event.

    Changelog records go through a confluent-kafka producer rather than Faust's own
    (`table.send_changelog`): the bytes, topic and partition are the ones Faust would
    write and recovers from, but librdkafka sends them from its own thread instead of
    the worker's event loop (benchmarks/README.md has the profiles). It also lets
    `flush` wait for the brokers: Faust's producer-buffer flush gives up after 0.1 s, so
    offsets could have been committed before the states reached the changelog.

    A delete (a None value in `put_many`, or `delete`) is a RocksDB delete and a
    changelog tombstone (a null value): Faust's recovery applies a null changelog value
    as a delete (`faust.stores.rocksdb.Store.apply_changelog_batch`), and compaction
    drops the key's earlier values, so a recovered table does not bring the user back.

    `expired` walks each open partition's database with a cursor, at most `budget`
    values per call, wrapping around at the end: the state TTL's bounded work per batch."""

    def __init__(self, table: Any, producer_conf: dict[str, Any]) -> None:
        self.table = table
        self.topic = table.changelog_topic.get_topic_name()
        # Uncompressed: a state is mostly float32 h and c, which lz4 shrank by 3 % (1,078 ->
        # 1,045 bytes a record on the broker) for 0.6-0.8 us of CPU a record.
        self.producer = reliable_producer(producer_conf, **{"compression.type": "none"})
        self._offsets: dict[int, int] = {}  # changelog partition -> last offset written
        self._errors: list[str] = []
        self._cursors: dict[int, bytes | None] = {}  # partition -> last key `expired` examined
        self._next_partition = 0

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err))
        elif msg.offset() > self._offsets.get(msg.partition(), -1):
            self._offsets[msg.partition()] = msg.offset()

    def _db(self, partition: int) -> Any:
        # Not cached: Faust closes and reopens a partition's database across rebalances.
        return faust_internals.db_for_partition(self.table, partition)

    def get(self, user_id: str, record: Record) -> bytes | None:
        return self._db(record.partition).get(user_id.encode())

    def put(self, user_id: str, value: bytes, record: Record) -> None:
        self.put_many([(user_id, value, record)])

    def delete(self, user_id: str, record: Record) -> None:
        self.put_many([(user_id, None, record)])

    def put_many(self, states: Iterable[tuple[str, bytes | None, Record]]) -> None:
        """Write RocksDB (one batch per partition) and send the changelog records, a
        None value being a delete and a changelog tombstone; `flush` waits for the
        brokers."""
        batches: dict[int, Any] = {}
        producer, topic, on_delivery = self.producer, self.topic, self._on_delivery
        produce = producer.produce
        for user_id, value, record in states:
            key = user_id.encode()
            partition = record.partition
            wb = batches.get(partition)
            if wb is None:
                wb = batches[partition] = WriteBatch(raw_mode=True)
            if value is None:
                wb.delete(key)
            else:
                wb.put(key, value)
            try:
                produce(topic, value, key, partition, on_delivery)
            except BufferError:  # local queue full: wait for deliveries to drain it
                produce_waiting(producer, topic, key, value, on_delivery, partition=partition)
        for partition, wb in batches.items():
            self._db(partition).write(wb)

    def expired(self, cutoff_ts: int, budget: int) -> list[tuple[str, int, bytes]]:
        """Values older than `cutoff_ts` among at most `budget` examined, partition by
        partition from where the last call stopped; each partition at most once a call."""
        out: list[tuple[str, int, bytes]] = []
        partitions = faust_internals.open_partitions(self.table)
        if not partitions:
            return out
        start = self._next_partition % len(partitions)
        for partition in partitions[start:] + partitions[:start]:
            if budget <= 0:
                break
            found, cursor, n = scan_expired(self._db(partition), self._cursors.get(partition), cutoff_ts, budget)
            self._cursors[partition] = cursor
            out += [(k.decode("utf-8", "replace"), partition, v) for k, v in found]
            budget -= n
            self._next_partition += 1
        return out

    async def flush(self, timeout: float = 120.0, warn_every: float = 30.0) -> None:
        """Wait until every changelog record written so far is acknowledged, then record
        the changelog offsets RocksDB holds (recovery resumes after them).

        librdkafka retries retriable errors (a leader moving, a broker restarting) by
        itself; records still unacknowledged are waited for up to `timeout` seconds, with
        a warning every `warn_every`, before DeliveryError ends the worker. A delivery
        error librdkafka reports is final: it ends the worker at once."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while True:
            wait = max(0.0, min(warn_every, deadline - time.monotonic()))
            remaining = await loop.run_in_executor(None, self.producer.flush, wait)
            if not remaining or self._errors or time.monotonic() >= deadline:
                break
            log.warning("changelog %s: %d records not yet acknowledged; waiting up to %.0fs more", self.topic,
                        remaining, deadline - time.monotonic())
        if remaining or self._errors:
            errs, self._errors = self._errors, []
            raise DeliveryError(f"changelog {self.topic}: {remaining} records not delivered within {timeout}s, "
                                f"errors: {errs[:3]}")
        offsets, self._offsets = self._offsets, {}
        for partition, offset in offsets.items():
            self.table.data.set_persisted_offset(TP(self.topic, partition), offset)


def install_restore(app: Any, table: Any, client_config: dict[str, Any]) -> ChangelogRestorer:
    """Bulk-restore the table's active changelog partitions at each rebalance before
    Faust's recovery reads them (restore.py says how and why); logs what each restore
    read, which is how a takeover by a standby shows it needed no full restore."""
    restorer = ChangelogRestorer(client_config, table.changelog_topic.get_topic_name(), table.data.offset_key)

    def db_for(partition: int) -> Any:
        return faust_internals.db_for_partition(table, partition)

    async def restore(spans: dict[int, tuple[int, int]], keep_going: Any, deadline: float) -> dict[int, int]:
        want = sum(max(0, last - first + 1) for first, last in spans.values())
        r = await restorer.restore(spans, db_for, keep_going, deadline)
        log.info("changelog restore: %d records in %.2f s (%.0f/s; %.2f s waiting for fetches, %.2f s RocksDB "
                 "writes) of %d offsets to read, partitions %s%s",
                 r.records, r.seconds, r.rate, r.fetch_wait_s, r.write_s, want, sorted(spans),
                 "" if r.complete else "; stopped early, Faust's recovery reads the rest")
        return r.applied

    faust_internals.restore_before_recovery(app, table, restore)
    return restorer


def scan_expired(db: Any, after: bytes | None, cutoff_ts: int, budget: int
                 ) -> tuple[list[tuple[bytes, bytes]], bytes | None, int]:
    """The (key, value) pairs of `db` (rocksdict, raw mode) whose event time is before
    `cutoff_ts`, among at most `budget` keys after `after` (None: from the first).
    Returns them, the cursor to resume from (None once the end was reached: the next
    scan starts over) and how many keys were examined."""
    it = db.iter()
    if after is None:
        it.seek_to_first()
    else:
        it.seek(after)
        if it.valid() and it.key() == after:
            it.next()
    found: list[tuple[bytes, bytes]] = []
    n = 0
    last = after
    while n < budget and it.valid():
        key, value = it.key(), it.value()
        ts = last_ts_of(value)
        if ts is not None and ts < cutoff_ts:  # None: one of Faust's own keys
            found.append((key, value))
        last = key
        n += 1
        it.next()
    return found, (last if it.valid() else None), n
