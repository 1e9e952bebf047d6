"""Users' event histories for an offline rebuild: read from a topic's retained records or
from an event file, into columns grouped by user (one segment per user, in the order the
worker would apply the events).

A topic is read partition by partition, each from its first retained offset (or a given
start) up to an end offset fixed before reading starts, so the history is exactly what the
live worker will not see again once the group's offsets are committed at those ends.
Records the worker would dead-letter (not a click event, key not the user id) are counted
and left out, as the worker leaves them out of the state.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clickvec.contract.events import EventError, parse_event
from clickvec.errors import ClickvecError
from clickvec.features import FIRST_GAP, N_GAP_BUCKETS, FeatureSpec
from clickvec.kafka import PARTITION_EOF

log = logging.getLogger(__name__)

PARTITIONERS = ("consistent_random", "murmur2_random")


class HistoryError(ClickvecError):
    """The history could not be read. Action: check the topic, the offsets given and the
    brokers; the message names the partition at fault."""


@dataclass
class History:
    """Events grouped by user: user `u`'s events are rows `starts[u]:starts[u+1]`, in order."""

    source: str  # input topic (or event file) the events came from
    users: list[str]
    starts: np.ndarray  # (U + 1,) int64
    items: np.ndarray  # (E,) int64 item index
    types: np.ndarray  # (E,) int64 event-type index
    ts: np.ndarray  # (E,) int64 epoch ms
    partition: np.ndarray  # (U,) int32 input partition of the user's events
    last_offset: np.ndarray  # (U,) int64 offset of the user's last event (-1: not from the topic)
    ends: dict[int, int] = field(default_factory=dict)  # partition -> first offset NOT covered
    starts_at: dict[int, int] = field(default_factory=dict)  # partition -> first offset read
    skipped: int = 0  # records left out (the worker would dead-letter them)

    @property
    def events(self) -> int:
        return int(self.starts[-1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)

    def gaps(self, prev_ts: np.ndarray | None = None) -> np.ndarray:
        """Gap bucket of every event (`clickvec.features.gap_bucket`, vectorised over all
        users); `prev_ts` (U,) is each user's event time before this history (-1: none)."""
        ts = self.ts
        prev = np.empty_like(ts)
        prev[1:] = ts[:-1]
        first = self.starts[:-1][self.lengths() > 0]
        prev[first] = -1 if prev_ts is None else prev_ts[self.lengths() > 0]
        gap_s = np.maximum(0.0, (ts - prev) / 1000.0)
        out = 2 + np.minimum(N_GAP_BUCKETS - 3, np.floor(np.log2(1.0 + gap_s)).astype(np.int64))
        out[prev < 0] = FIRST_GAP
        return out


class Columns:
    """Per-event columns as they are read; `history()` groups them by user."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self.index: dict[str, int] = {}
        self.users: list[str] = []
        self.user_partition: list[int] = []
        self.user_offset: list[int] = []
        self.u: list[int] = []
        self.items: list[int] = []
        self.types: list[int] = []
        self.ts: list[int] = []
        self.skipped = 0

    def add(self, user_id: str, item_id: str, event_type: str, ts: int, partition: int, offset: int) -> None:
        u = self.index.get(user_id)
        if u is None:
            u = self.index[user_id] = len(self.users)
            self.users.append(user_id)
            self.user_partition.append(partition)
            self.user_offset.append(offset)
        elif self.user_partition[u] != partition:
            raise HistoryError(f"user {user_id!r} has events in partitions {self.user_partition[u]} and "
                               f"{partition}: the input topic must be keyed by user_id")
        self.user_offset[u] = offset
        self.u.append(u)
        self.items.append(self.spec.item_index(item_id))
        self.types.append(self.spec.type_index(event_type))
        self.ts.append(ts)

    def history(self, source: str) -> History:
        u = np.asarray(self.u, dtype=np.int64)
        order = np.argsort(u, kind="stable")  # each user's events keep their read order
        counts = np.bincount(u, minlength=len(self.users))
        starts = np.zeros(len(self.users) + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        return History(source, self.users, starts,
                       np.asarray(self.items, dtype=np.int64)[order],
                       np.asarray(self.types, dtype=np.int64)[order],
                       np.asarray(self.ts, dtype=np.int64)[order],
                       np.asarray(self.user_partition, dtype=np.int32),
                       np.asarray(self.user_offset, dtype=np.int64), skipped=self.skipped)


def add_record(cols: Columns, key: bytes | None, value: bytes | None, partition: int, offset: int) -> None:
    try:
        ev = parse_event(value)
    except EventError:
        cols.skipped += 1
        return
    if key is None or key.decode("utf-8", "replace") != ev.user_id:
        cols.skipped += 1  # the worker dead-letters it (key_mismatch)
        return
    cols.add(ev.user_id, ev.item_id, ev.event_type, ev.ts, partition, offset)


def end_offsets(conf: dict[str, Any], topic: str, timeout: float = 30.0) -> dict[int, tuple[int, int]]:
    """partition -> (low, high) watermarks of `topic` (HistoryError if it does not exist)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({**conf, "group.id": "clickvec-lifecycle-probe", "enable.auto.commit": False})
    try:
        md = c.list_topics(topic, timeout=timeout).topics.get(topic)
        if md is None or md.error is not None or not md.partitions:
            raise HistoryError(f"topic {topic!r} does not exist on {conf.get('bootstrap.servers')}")
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
                for p in sorted(md.partitions)}
    finally:
        c.close()


def read_topic(conf: dict[str, Any], topic: str, spec: FeatureSpec, until: dict[int, int] | None = None,
               start: dict[int, int] | None = None, timeout: float = 60.0,
               partitions: Iterable[int] | None = None) -> History:
    """The events of `topic` from `start` (default: the first retained offset) up to
    `until` (default: the end offsets now), per partition (`partitions`: only those),
    grouped by user."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    marks = end_offsets(conf, topic)
    if partitions is not None:
        marks = {p: marks[p] for p in partitions if p in marks}
    cols = Columns(spec)
    ends: dict[int, int] = {}
    begins: dict[int, int] = {}
    for p, (low, high) in marks.items():
        end = high if until is None or p not in until else min(high, until[p])
        begins[p] = max(low, (start or {}).get(p, low))
        ends[p] = max(end, begins[p])
    c = Consumer({**conf, "group.id": "clickvec-lifecycle-reader", "enable.auto.commit": False,
                  "enable.partition.eof": True, "isolation.level": "read_committed",
                  "fetch.max.bytes": 64 << 20, "max.partition.fetch.bytes": 16 << 20})
    try:
        todo = {p for p in ends if ends[p] > begins[p]}
        c.assign([TopicPartition(topic, p, begins[p]) for p in sorted(todo)])
        deadline = time.monotonic() + timeout
        while todo:
            if time.monotonic() > deadline:
                raise HistoryError(f"{topic}: partitions {sorted(todo)} not read to their end offsets: "
                                   f"nothing arrived for {timeout:.0f}s")
            msgs = c.consume(num_messages=10_000, timeout=0.5)
            if msgs:
                deadline = time.monotonic() + timeout  # a limit on silence, not on the history's size
            for m in msgs:
                p = m.partition()
                err = m.error()
                if err is not None:
                    if err.code() == PARTITION_EOF:
                        # read_committed: the last offsets may be transaction markers
                        if m.offset() >= ends[p]:
                            todo.discard(p)
                        continue
                    raise HistoryError(f"{topic}[{p}]: {KafkaException(err)}")
                if p not in todo:
                    continue
                if m.offset() >= ends[p]:
                    todo.discard(p)
                    continue
                add_record(cols, m.key(), m.value(), p, m.offset())
                if m.offset() + 1 >= ends[p]:
                    todo.discard(p)
    finally:
        c.close()
    hist = cols.history(topic)
    hist.ends, hist.starts_at = ends, begins
    return hist


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java clients' and librdkafka's murmur2_random partitioner)."""
    m, r = 0x5BD1E995, 24
    length = len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    rest = length % 4
    tail = data[length - rest:]
    if rest == 3:
        h ^= tail[2] << 16
    if rest >= 2:
        h ^= tail[1] << 8
    if rest >= 1:
        h ^= tail[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def key_partition(key: bytes, partitions: int, partitioner: str = "consistent_random") -> int:
    """The partition a producer with `partitioner` (librdkafka's names) puts `key` in:
    consistent_random is librdkafka's default (`clickvec produce`), murmur2_random the
    Java clients' default."""
    if partitioner == "consistent_random":
        return zlib.crc32(key) % partitions
    if partitioner == "murmur2_random":
        return (murmur2(key) & 0x7FFFFFFF) % partitions
    raise ValueError(f"partitioner must be one of {PARTITIONERS}")


def read_file(path: str, spec: FeatureSpec, partitions: int, partitioner: str = "consistent_random") -> History:
    """An event file's events (time order within each user, as written), each user placed
    on the partition its events go to in the input topic (`key_partition`)."""
    from clickvec.eventfile import read_table

    table = read_table(path)
    cols = Columns(spec)
    placed: dict[str, int] = {}
    for batch in table.select(["user_id", "item_id", "event_type", "ts"]).to_batches(64 * 1024):
        rows: Iterable[tuple[str, str, str, int]] = zip(*(batch.column(i).to_pylist() for i in range(4)),
                                                        strict=True)
        for uid, item, etype, ts in rows:
            p = placed.get(uid)
            if p is None:
                p = placed[uid] = key_partition(uid.encode(), partitions, partitioner)
            cols.add(uid, item, etype, int(ts), p, -1)
    return cols.history(str(path))
