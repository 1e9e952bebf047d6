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
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition
from rocksdict import WriteBatch

from clickvec.kafka import PARTITION_EOF

log = logging.getLogger(__name__)

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
            "fetch.max.bytes": 64 << 20,
            "max.partition.fetch.bytes": 16 << 20,
            "queued.max.messages.kbytes": 256 << 10,
        })

    async def restore(self, spans: dict[int, tuple[int, int]], db_for: Callable[[int], Any],
                      keep_going: Callable[[], bool], deadline: float) -> RestoreResult:
        """Apply changelog offsets first..last (inclusive) of each partition in `spans`
        to `db_for(partition)`. Stops before writing a chunk when `keep_going()` is
        false, and after the chunk in progress at `deadline` (time.monotonic())."""
        result = RestoreResult()
        pending = {p: last for p, (first, last) in spans.items() if last >= first}
        if not pending:
            return result
        t0 = time.monotonic()
        consumer = self._consumer()
        # One thread: the consumer's calls (consume, then close) run one after the other
        # even when this coroutine is cancelled while a consume is in flight.
        pool = ThreadPoolExecutor(1, thread_name_prefix="clickvec-restore")
        loop = asyncio.get_running_loop()
        try:
            consumer.assign([TopicPartition(self.topic, p, spans[p][0]) for p in pending])
            while pending:
                if time.monotonic() > deadline:
                    result.complete = False
                    break
                msgs = await loop.run_in_executor(pool, consumer.consume, self.chunk, 0.5)
                if not keep_going():
                    result.complete = False
                    break
                finished = self._apply(msgs, pending, db_for, result)
                if finished:
                    consumer.pause([TopicPartition(self.topic, p) for p in finished])
        finally:
            pool.submit(consumer.close)
            pool.shutdown(wait=False)
            result.seconds = time.monotonic() - t0
        return result

    def _apply(self, msgs: list[Any], pending: dict[int, int], db_for: Callable[[int], Any],
               result: RestoreResult) -> list[int]:
        """Write one `consume` call's records (one WriteBatch per partition, its last
        offset in it); returns the partitions whose span is now complete."""
        batches: dict[int, Any] = {}
        last: dict[int, int] = {}
        finished: list[int] = []
        n = 0
        for m in msgs:
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
            n += 1
            if off == end:
                del pending[p]
                finished.append(p)
        for p, wb in batches.items():
            wb.put(self.offset_key, str(last[p]).encode())  # Faust's persisted offset, atomically
            db_for(p).write(wb)
            result.applied[p] = last[p]
        result.records += n
        return finished
