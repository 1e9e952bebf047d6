"""Bulk restore of the user-state table from its changelog, ahead of Faust's recovery.

Faust's recovery reads a changelog record by record through its consumer, its
recovery queue and a buffer of events (about 4k records/s on the 2-core benchmark
machine, benchmarks/README.md "Recovery"). At a rebalance the worker first reads each
assigned changelog partition from the offset its RocksDB holds up to the high watermark
Faust has just read, with a confluent-kafka consumer of its own (librdkafka fetches and
decompresses on its own threads, `consume` hands over thousands of records per call),
and writes them as one RocksDB `WriteBatch` per partition and chunk, the partition's
persisted offset in the same batch; Faust then finds nothing left to read (or, when
the restore stopped early, the rest, which it reads as before).

What a record does is what Faust's `Store.apply_changelog_batch` does with it: a value
is put under its key, a null value (a tombstone: a forgotten or expired user) deletes
the key, records apply in offset order (the last value of a key wins). The offset is
written with the values in one atomic batch, so the database is always the changelog's
prefix up to its persisted offset, whatever stops the restore (a rebalance, a crash).

Correctness under rebalance: the restore is told the generation it runs for and stops
before writing a chunk once a new rebalance started (the chunk is dropped); the writes
happen on the event loop, between awaits, so Faust cannot close or hand over a database
in the middle of one. Only the partitions Faust assigned as active are read, only up to
the high watermark Faust read for them, and a record past it is left to Faust.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition
from rocksdict import WriteBatch, WriteOptions

from clickvec.kafka import PARTITION_EOF

log = logging.getLogger(__name__)

# While a restore writes a database, RocksDB does not compact it (compaction would
# rewrite what the restore is still writing, on the same cores; measured: 1M users in
# 15.7-15.8 s against 18.7-21.8 s with it, benchmarks/README.md). Its L0 write stall
# triggers go up meanwhile (with compaction off, the stop trigger would stop the writes for
# good); a database whose L0 reaches L0_CAP files is compacted again during the restore.
# Afterwards the options are set back to RocksDB's defaults, which Faust opens with.
RESTORING = {"disable_auto_compactions": "true", "level0_slowdown_writes_trigger": "1000",
             "level0_stop_writes_trigger": "1000"}
RESTORED = {"disable_auto_compactions": "false", "level0_slowdown_writes_trigger": "20",
            "level0_stop_writes_trigger": "36"}
L0_CAP = 48
# Below this many offsets a partition's restore leaves compaction on: switching it off and
# on costs more (two option writes, about 35 ms a database here) than it saves.
COMPACTION_OFF_ABOVE = 50_000

# Records per `consume` call: one call's records make one WriteBatch per partition. Large
# enough that the per-call costs vanish, small enough (about 20 MB of 1 KB states) that a
# rebalance is noticed within a fraction of a second.
CHUNK = 20_000


@dataclass
class RestoreResult:
    """Per partition, the last changelog offset written to RocksDB (partitions with no
    record written are absent), and what it took."""

    applied: dict[int, int] = field(default_factory=dict)
    records: int = 0
    seconds: float = 0.0
    complete: bool = True  # every span read to its end
    fetch_wait_s: float = 0.0  # waiting for `consume` (the fetches, or records not yet there)
    write_s: float = 0.0  # RocksDB writes of the batches

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


class ChangelogRestorer:
    """Reads changelog spans with confluent-kafka and writes them into the partitions'
    RocksDB databases (rocksdict, raw mode), as Faust's recovery would."""

    def __init__(self, client_config: dict[str, Any], topic: str, offset_key: bytes, chunk: int = CHUNK) -> None:
        self.client_config = client_config
        self.topic = topic
        self.offset_key = offset_key
        self.chunk = chunk
        self._no_wal = WriteOptions()
        self._no_wal.disable_wal = True

    def _consumer(self) -> Consumer:
        return Consumer({
            **self.client_config,
            # Never commits: the group only names the client; offsets come from RocksDB.
            "group.id": f"clickvec-restore-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",  # a start below the log's start: what is left of it
            "enable.partition.eof": True,  # a span whose last offsets are markers ends at EOF
            "isolation.level": "read_committed",  # as the worker's Faust consumer reads
            "fetch.wait.max.ms": 50,
            # Fetches of up to 16 MB, at most 32 MB prefetched, fetched again as soon as
            # the queue has room (librdkafka's default waits a second once it was full).
            # Measured, 1M users: 10.5-12.6 s and 370 MB peak RSS, against 17.5-30 s and
            # 490-520 MB with four times these.
            "fetch.max.bytes": 16 << 20,
            "max.partition.fetch.bytes": 4 << 20,
            "queued.max.messages.kbytes": 32 << 10,
            "fetch.queue.backoff.ms": 10,
        })

    async def restore(self, spans: dict[int, tuple[int, int]], db_for: Callable[[int], Any],
                      keep_going: Callable[[], bool], deadline: float) -> RestoreResult:
        """Apply changelog offsets first..last (inclusive) of each partition in `spans`
        to `db_for(partition)`. Stops before writing a chunk when `keep_going()` is
        false, and after the chunk in progress at `deadline` (time.monotonic()).

        A chunk is fetched and turned into WriteBatches on a thread of its own while
        the one before it is written on the event loop (librdkafka and RocksDB release
        the GIL while they work)."""
        result = RestoreResult()
        pending = {p: last for p, (first, last) in spans.items() if last >= first}
        if not pending:
            return result
        t0 = time.monotonic()
        # The databases as open now (the writes stop with the generation, before Faust
        # could reopen one): flushed and set back below whatever stops the restore.
        dbs = {p: db_for(p) for p in pending}
        big = {p for p in pending if pending[p] - spans[p][0] + 1 > COMPACTION_OFF_ABOVE}  # compaction off
        for p in big:
            dbs[p].set_options(RESTORING)
        consumer = self._consumer()
        # Each `consume` call makes `chunk` Message objects, which the cyclic garbage
        # collector tracks and walks (11 % of the restore's samples in a 1M-user
        # profile) though they never form cycles: it is paused while the restore runs.
        collecting = gc.isenabled()
        gc.disable()
        # One thread: the consumer's calls (consume, then close) run one after the other
        # even when this coroutine is cancelled while a consume is in flight.
        pool = ThreadPoolExecutor(1, thread_name_prefix="clickvec-restore")
        loop = asyncio.get_running_loop()
        try:
            consumer.assign([TopicPartition(self.topic, p, spans[p][0]) for p in pending])
            expect = {p: spans[p][0] for p in pending}  # the next offset to read
            next_chunk = loop.run_in_executor(pool, self._fetch, consumer, pending, expect)
            while True:
                t = time.monotonic()
                chunk = await next_chunk
                result.fetch_wait_s += time.monotonic() - t
                if not keep_going():
                    result.complete = False
                    break
                more = bool(pending) and time.monotonic() <= deadline
                if more:  # pending: changed by `_fetch` only, which is not running now
                    next_chunk = loop.run_in_executor(pool, self._fetch, consumer, pending, expect)
                self._write(chunk, dbs, big, result)
                if not more:
                    result.complete = not pending
                    break
        except Exception as exc:  # noqa: BLE001 - Faust's own reader then reads the rest
            log.warning("changelog restore stopped: %s; Faust's recovery reads what it did not", exc)
            result.complete = False
        finally:
            if collecting:
                gc.enable()
            self._done(dbs, big)
            pool.submit(consumer.close)
            pool.shutdown(wait=False)
            result.seconds = time.monotonic() - t0
        return result

    @staticmethod
    def _done(dbs: dict[int, Any], big: set[int]) -> None:
        """Make the restore's writes durable before anything else writes the databases,
        and compact them again.

        The restore writes without RocksDB's write-ahead log (each record would
        otherwise be written twice): a crash loses the writes still in the memtables,
        which are the newest, with the persisted offset written with them, so what
        survives is a prefix of the changelog with its offset. Flushing the memtables here,
        before the worker or Faust writes again (with the log), keeps that so."""
        for p, db in dbs.items():
            db.flush(True)
            if p in big:
                db.set_options(RESTORED)

    def _write(self, chunk: tuple[dict[int, Any], dict[int, int], int], dbs: dict[int, Any], big: set[int],
               result: RestoreResult) -> None:
        """Write one chunk's WriteBatches, each with its partition's last offset."""
        batches, last, n = chunk
        t = time.monotonic()
        for p, wb in batches.items():
            wb.put(self.offset_key, str(last[p]).encode())  # Faust's persisted offset, atomically
            db = dbs[p]
            db.write(wb, self._no_wal)
            result.applied[p] = last[p]
            if p in big and db.property_int_value("rocksdb.num-files-at-level0") >= L0_CAP:
                db.set_options(RESTORED)
                big.discard(p)
        result.write_s += time.monotonic() - t
        result.records += n

    def _fetch(self, consumer: Consumer, pending: dict[int, int], expect: dict[int, int]
               ) -> tuple[dict[int, Any], dict[int, int], int]:
        """One `consume` call's records as one WriteBatch per partition (in the restore's
        thread): the batches, each partition's last offset, the number of records.
        Partitions whose span is complete leave `pending` and are paused.

        It asks for no more records than the spans have left (`expect`: each partition's
        next offset): `consume` waits for as many as it is asked for, up to its timeout,
        so the last call of a restore would otherwise wait the whole timeout."""
        batches: dict[int, Any] = {}
        last: dict[int, int] = {}
        finished: list[int] = []
        n = 0
        left = sum(end - expect[p] + 1 for p, end in pending.items())
        for m in consumer.consume(max(1, min(self.chunk, left)), 0.5):
            p = m.partition()
            end = pending.get(p)
            err = m.error()
            if err is not None:
                if err.code() != PARTITION_EOF:
                    raise KafkaException(err)
                if end is not None:  # at the log's end: what follows is Faust's
                    del pending[p]
                    finished.append(p)
                    if m.offset() > end:
                        # Read through `end`, which is no record (a transaction marker):
                        # recorded as applied, so that Faust does not wait to read it.
                        last[p] = end
                        if p not in batches:
                            batches[p] = WriteBatch(raw_mode=True)
                continue
            if end is None:
                continue  # past its span (the partition is finished)
            off = m.offset()
            if off > end:
                del pending[p]
                finished.append(p)
                continue
            wb = batches.get(p)
            if wb is None:
                wb = batches[p] = WriteBatch(raw_mode=True)
            value = m.value()
            if value is None:
                wb.delete(m.key())
            else:
                wb.put(m.key(), value)
            last[p] = off
            expect[p] = off + 1
            n += 1
            if off == end:
                del pending[p]
                finished.append(p)
        if finished:
            consumer.pause([TopicPartition(self.topic, p) for p in finished])
        return batches, last, n
