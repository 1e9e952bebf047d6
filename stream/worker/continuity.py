"""Offset continuity of the input partitions: no event is skipped over.

Faust can lose fetched messages across a rebalance: records fetched under one consumer
generation are dropped when the generation changes, but the fetch position has already
moved past them, and nothing seeks back (see faust `Consumer.getmany` and the generation
check in `Stream`). The events after such a hole would then be applied onto a state that
misses the events in the hole, and the events in the hole, if they ever come back, look
like replays: the vectors of that user are wrong from then on.

`Continuity` keeps, per input partition, the next offset this worker must apply. Before a
batch is processed it finds every hole (a record whose offset is beyond the expected
one) and reads the missing records straight from the brokers, with a consumer outside
the group, so the batch is applied without holes. After each rebalance the expected
offset of a partition starts again at the group's committed offset: everything below it
was applied (offsets are committed only after states reach the changelog), everything
from it on is either in this batch, in a hole we fill, or a replay the engine skips.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, TypeVar

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, TopicPartition

from clickvec.kafka import PARTITION_EOF
from clickvec.stream.worker.engine import Record

log = logging.getLogger(__name__)

T = TypeVar("T")
# Errors a request may fail with while a coordinator or a partition leader loads or
# moves, which librdkafka does not always flag retriable; -185, -195 and -190 are
# librdkafka's local "timed out", "transport failure" and "unknown partition" (no leader
# known yet, e.g. the leader's broker just died; confluent_kafka exposes them only as
# private names).
RETRIABLE_CODES = frozenset({KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                             KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.REQUEST_TIMED_OUT,
                             KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_LEADER_FOR_PARTITION,
                             -185, -195, -190})
UNKNOWN_PARTITION = -190  # librdkafka's local "unknown partition"


def retrying(call: Callable[[], T], what: str, timeout: float, first_wait: float = 0.1) -> T:
    """`call()`, retried with exponential backoff while it fails with a retriable Kafka
    error (a coordinator not yet loaded or moved, e.g. on a freshly started broker), for
    at most `timeout` seconds; then, or on any other error, GapError."""
    deadline = time.monotonic() + timeout
    wait = first_wait
    while True:
        try:
            return call()
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            retriable = isinstance(err, KafkaError) and (err.retriable() or err.code() in RETRIABLE_CODES)
            if not retriable or time.monotonic() + wait > deadline:
                raise GapError(f"{what}: {exc}") from None
            log.info("%s: %s; retrying in %.1fs", what, err, wait)
        time.sleep(wait)
        wait = min(wait * 2, 2.0)


def low_watermark(c: Consumer, topic: str, partition: int, timeout: float) -> int:
    """The partition's low watermark, from its leader. On librdkafka's local "unknown
    partition" the topic's metadata is asked for before the error goes to the caller's
    retry: librdkafka refreshes by itself only the metadata of topics a client consumes or
    produces, and a client that only queries offsets can keep a cached view without the
    partition after its leader moved."""
    try:
        return int(c.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout)[0])
    except KafkaException as exc:
        err = exc.args[0] if exc.args else None
        if isinstance(err, KafkaError) and err.code() == UNKNOWN_PARTITION:
            try:
                c.list_topics(topic, timeout=timeout)
            except KafkaException as refresh:
                log.info("metadata of %s: %s", topic, refresh)
        raise


class GapError(RuntimeError):
    """The records of a hole could not be read back within the time allowed. The worker
    stops without acking the batch, so the events come back after a restart."""


def find_holes(records: Sequence[Record], expected: dict[int, int],
               skips: dict[tuple[int, int], int] | None = None,
               passed: list[tuple[int, int, int]] | None = None) -> list[tuple[int, int, int]]:
    """Holes in `records` given the next expected offset per partition.

    Returns (index, partition, start) for each record at `index` whose offset is beyond
    the expected one: offsets [start, records[index].offset) are missing before it.
    Updates `expected` past every record; partitions missing from it are not checked
    (the first record of an unknown partition sets its expectation).

    A gap the consumer skipped over right after the record this worker applied last
    (`skips` gives the record before it, see feed.Batch) holds nothing a read_committed
    reader sees (transaction markers, aborted records): no hole; it is appended to
    `passed` as (partition, start, end)."""
    holes: list[tuple[int, int, int]] = []
    for i, rec in enumerate(records):
        want = expected.get(rec.partition)
        if want is not None and rec.offset > want:
            if skips is not None and skips.get((rec.partition, rec.offset)) == want - 1:
                if passed is not None:
                    passed.append((rec.partition, want, rec.offset))
            else:
                holes.append((i, rec.partition, want))
        if want is None or rec.offset >= want:
            expected[rec.partition] = rec.offset + 1
    return holes


class Continuity:
    """Fills the holes of each batch from the brokers (see the module docstring).

    `on_filled(partition, start, end)` is told about each filled range [start, end), so
    the consumer can count those offsets as done when it commits; `on_passed` likewise
    about each gap that holds nothing readable (`find_holes`).

    One read-back at a time: `complete` and `tail` share the consumer and the expected
    offsets, and each holds `lock` throughout (a sweep's expectations overwritten by a
    batch's read-back during an await gave false holes and dead letters twice)."""

    def __init__(self, conf: dict[str, Any], topic: str, group: str,
                 on_filled: Callable[[int, int, int], Awaitable[None]] | None = None,
                 timeout: float = 60.0,
                 on_passed: Callable[[int, int, int], Awaitable[None]] | None = None) -> None:
        self.topic = topic
        self.timeout = timeout
        self.on_filled = on_filled
        self.on_passed = on_passed
        self.expected: dict[int, int] = {}
        self.generation: int | None = None
        self.filled = 0  # records read back into batches, in total
        self.passed = 0  # offsets skipped over with nothing readable, in total
        self.lock = asyncio.Lock()
        # read_committed, as the worker's own consumer: an aborted transaction's records
        # are never applied.
        self._conf = {**conf, "group.id": group, "enable.auto.commit": False,
                      "enable.auto.offset.store": False, "auto.offset.reset": "earliest",
                      "enable.partition.eof": True, "isolation.level": "read_committed"}
        self._consumer: Consumer | None = None

    def _client(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer(self._conf)
        return self._consumer

    def _start_offsets(self, partitions: list[int]) -> dict[int, int]:
        """The group's committed offset of each partition (the low watermark if none)."""
        c = self._client()
        out: dict[int, int] = {}
        tps = [TopicPartition(self.topic, p) for p in partitions]

        def committed() -> list[TopicPartition]:
            got = c.committed(tps, timeout=self.timeout)
            for tp in got:
                if tp.error is not None:
                    raise KafkaException(tp.error)
            return got

        for tp in retrying(committed, f"committed offsets of {self.topic}", self.timeout):
            off = tp.offset
            if off == OFFSET_INVALID or off < 0:
                off = retrying(partial(low_watermark, c, self.topic, tp.partition, self.timeout),
                               f"low watermark of {self.topic}[{tp.partition}]", self.timeout)
            out[tp.partition] = off
        return out

    def _read(self, partition: int, start: int, end: int) -> list[Record]:
        """Records of [start, end) of one partition (fewer where the log has none)."""
        c = self._client()
        tp = TopicPartition(self.topic, partition, start)
        c.assign([tp])
        got: list[Record] = []
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                pos = c.position([TopicPartition(self.topic, partition)])[0].offset
                if got and got[-1].offset >= end - 1 or pos >= end:
                    break
                if time.monotonic() > deadline:
                    raise GapError(f"{self.topic}[{partition}] offsets {start}..{end - 1}: read "
                                   f"{len(got)} records in {self.timeout}s")
                # Short polls: a range holding nothing readable (an aborted transaction)
                # returns no message, only a position past it.
                for m in c.consume(num_messages=1000, timeout=0.1):
                    if m.partition() != partition:  # left over from an earlier read
                        continue
                    if m.error() is not None:
                        if m.error().code() == PARTITION_EOF:
                            if m.offset() >= end:
                                continue
                            raise GapError(f"{self.topic}[{partition}] ends at {m.offset()} before {end}")
                        if m.error().retriable() or m.error().code() in RETRIABLE_CODES:
                            continue  # a leader moving: librdkafka retries, the deadline bounds it
                        raise GapError(f"{self.topic}[{partition}]: {m.error()}")
                    if start <= m.offset() < end:
                        got.append(Record(m.key(), m.value(), self.topic, partition, m.offset()))
        finally:
            c.unassign()
        return got

    async def complete(self, records: list[Record], generation: int,
                       skips: dict[tuple[int, int], int] | None = None) -> list[Record]:
        """`records` with every hole filled in, in offset order per partition."""
        async with self.lock:
            return await self._complete(records, generation, skips)

    async def _complete(self, records: list[Record], generation: int,
                        skips: dict[tuple[int, int], int] | None) -> list[Record]:
        loop = asyncio.get_running_loop()
        first: dict[int, int] = {}
        for r in records:
            if r.offset < first.get(r.partition, r.offset + 1):
                first[r.partition] = r.offset
        await self._expect(first, generation)
        passed: list[tuple[int, int, int]] = []
        holes = find_holes(records, self.expected, skips, passed)
        for partition, start, end in passed:
            self.passed += end - start
            if self.on_passed is not None:
                await self.on_passed(partition, start, end)
        if not holes:
            return records
        out: list[Record] = []
        prev = 0
        for index, partition, start in holes:
            at = records[index]
            fill = await loop.run_in_executor(None, self._read, partition, start, at.offset)
            log.warning("%s[%d]: offsets %d..%d were not delivered by the consumer; read %d back from the "
                        "brokers", self.topic, partition, start, at.offset - 1, len(fill))
            out.extend(records[prev:index])
            out.extend(fill)
            prev = index
            self.filled += len(fill)
            if self.on_filled is not None:
                await self.on_filled(partition, start, at.offset)
        out.extend(records[prev:])
        return out

    async def _expect(self, first: dict[int, int], generation: int) -> None:
        """Start the expectation of partitions not seen in this generation: the group's
        committed offset (below it everything was applied), or `first` if lower."""
        if generation != self.generation:
            self.expected = {}
            self.generation = generation
        new = sorted(set(first) - set(self.expected))
        if new:
            starts = await asyncio.get_running_loop().run_in_executor(None, self._start_offsets, new)
            for p in new:
                self.expected[p] = min(starts[p], first[p])

    async def tail(self, positions: dict[int, int], generation: int) -> list[Record]:
        """Records below `positions` that were never applied: a hole at the end of a
        partition, which no later record reveals. Call only while no batch is pending
        anywhere (the caller checks that the worker has been idle), with positions no
        further than the records the consumer returned (feed.BatchFeed.fetched_to):
        past them, a read_committed consumer skipped only what no reader sees."""
        async with self.lock:
            return await self._tail(positions, generation)

    async def _tail(self, positions: dict[int, int], generation: int) -> list[Record]:
        await self._expect(positions, generation)
        out: list[Record] = []
        for partition, pos in sorted(positions.items()):
            start = self.expected[partition]
            if pos <= start:
                continue
            got = await asyncio.get_running_loop().run_in_executor(None, self._read, partition, start, pos)
            log.warning("%s[%d]: offsets %d..%d were consumed but never delivered; read %d back from the "
                        "brokers", self.topic, partition, start, pos - 1, len(got))
            self.expected[partition] = pos
            self.filled += len(got)
            out.extend(got)
            if self.on_filled is not None:
                await self.on_filled(partition, start, pos)
        return out

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
