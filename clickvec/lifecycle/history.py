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

import gc
import logging
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import compress
from typing import Any

import numpy as np

from clickvec.contract.events import parse_core_many
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
    """Per-event columns as they are read, in chunks of arrays (one per `add_rows`);
    `history()` groups them by user. Ids become indices a chunk at a time: Python work
    per event is a few dict look-ups in list comprehensions."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self.index: dict[str, int] = {}  # user id -> user index, in order of first event
        self.chunks: list[tuple[np.ndarray, ...]] = []  # (u, item, type, ts, partition, offset)
        self.skipped = 0
        self._items: dict[str, int] = {}  # memo of spec.item_index (a hash spec hashes once per id)
        self._types: dict[str, int] = {}

    def add(self, user_id: str, item_id: str, event_type: str, ts: int, partition: int, offset: int) -> None:
        self.add_rows([user_id], [item_id], [event_type], [ts], [partition], [offset])

    def add_rows(self, users: Sequence[str], items: Sequence[str], types: Sequence[str], ts: Sequence[int],
                 partitions: Sequence[int] | np.ndarray, offsets: Sequence[int] | np.ndarray) -> None:
        """Events in read order (each user's events in the order the worker applies them)."""
        index, memo_i, memo_t = self.index, self._items, self._types
        for x in set(items).difference(memo_i):
            memo_i[x] = self.spec.item_index(x)
        for x in set(types).difference(memo_t):
            memo_t[x] = self.spec.type_index(x)
        self.chunks.append((
            np.fromiter([index.setdefault(x, len(index)) for x in users], np.int64, len(users)),
            np.fromiter([memo_i[x] for x in items], np.int64, len(items)),
            np.fromiter([memo_t[x] for x in types], np.int64, len(types)),
            np.asarray(ts, dtype=np.int64), np.asarray(partitions, dtype=np.int32),
            np.asarray(offsets, dtype=np.int64)))

    def add_messages(self, keys: list[bytes | None], values: list[bytes | None],
                     partitions: Sequence[int] | np.ndarray, offsets: Sequence[int] | np.ndarray) -> None:
        """Records of the input topic, validated as the worker validates them
        (`parse_core_many` is `parse_event` on each value); those it would dead-letter
        (not a click event, key not the user id) are counted in `skipped` and left out."""
        # The cyclic collector would walk the batch's tuples (acyclic, freed with the batch)
        # on every few hundred allocations: paused, a batch costs ~40% less.
        enabled = gc.isenabled()
        gc.disable()
        try:
            self._add_messages(keys, values, partitions, offsets)
        finally:
            if enabled:
                gc.enable()

    def _add_messages(self, keys: list[bytes | None], values: list[bytes | None],
                      partitions: Sequence[int] | np.ndarray, offsets: Sequence[int] | np.ndarray) -> None:
        evs = parse_core_many(values)
        # The key is the user id as the worker compares them (the key decoded with
        # replacement); equal UTF-8 bytes settle it without decoding.
        ok = [ev is not None and k is not None and (k == ev[0].encode() or k.decode("utf-8", "replace") == ev[0])
              for k, ev in zip(keys, evs, strict=True)]
        if not all(ok):
            self.skipped += ok.count(False)  # the worker dead-letters them (invalid event or key_mismatch)
            evs = list(compress(evs, ok))
            partitions, offsets = list(compress(partitions, ok)), list(compress(offsets, ok))
        if evs:
            users, items, types, ts = zip(*evs, strict=True)  # type: ignore[misc]
            self.add_rows(users, items, types, ts, partitions, offsets)

    def history(self, source: str) -> History:
        users = list(self.index)
        empty = np.empty(0, np.int64)
        cat = [np.concatenate(c) for c in zip(*self.chunks, strict=True)] if self.chunks else [empty] * 6
        u, items, types, ts, part, off = cat
        order = np.argsort(u, kind="stable")  # each user's events keep their read order
        counts = np.bincount(u, minlength=len(users))
        starts = np.zeros(len(users) + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        part = part[order]
        user_part = part[starts[:-1]].astype(np.int32)  # every user has an event
        bad = np.flatnonzero(part != np.repeat(user_part, counts))
        if bad.size:
            x = int(np.searchsorted(starts, bad[0], side="right")) - 1
            raise HistoryError(f"user {users[x]!r} has events in partitions {user_part[x]} and "
                               f"{part[bad[0]]}: the input topic must be keyed by user_id")
        return History(source, users, starts, items[order], types[order], ts[order], user_part,
                       off[order][starts[1:] - 1], skipped=self.skipped)


def add_record(cols: Columns, key: bytes | None, value: bytes | None, partition: int, offset: int) -> None:
    """One record (`Columns.add_messages` does many at once)."""
    cols.add_messages([key], [value], [partition], [offset])


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
    from confluent_kafka import Consumer, TopicPartition

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
            _take(topic, msgs, ends, todo, cols)
    finally:
        c.close()
    hist = cols.history(topic)
    hist.ends, hist.starts_at = ends, begins
    return hist


def _take(topic: str, msgs: list[Any], ends: dict[int, int], todo: set[int], cols: Columns) -> None:
    """One consume() call's messages into `cols`: those of partitions still to read,
    below their end offsets; a partition is done once its end is reached. Per message only
    its accessors run, in list comprehensions; the bounds are checked with numpy."""
    from confluent_kafka import KafkaException

    live = dict.fromkeys(todo)  # the partitions to read as the batch starts (EOFs below may end some)
    if any(m.error() is not None for m in msgs):
        data = []
        for m in msgs:
            err = m.error()
            if err is None:
                data.append(m)
            elif err.code() == PARTITION_EOF:
                # read_committed: the last offsets may be transaction markers
                if m.offset() >= ends[m.partition()]:
                    todo.discard(m.partition())
            else:
                raise HistoryError(f"{topic}[{m.partition()}]: {KafkaException(err)}")
        msgs = data
    if not msgs:
        return
    parts = np.fromiter([m.partition() for m in msgs], np.int64, len(msgs))
    offs = np.fromiter([m.offset() for m in msgs], np.int64, len(msgs))
    end = np.full(int(parts.max()) + 1, -1, np.int64)  # -1: a partition not (or no longer) to read
    for p in live:
        if p < len(end):
            end[p] = ends[p]
    keep = offs < end[parts]
    for p in np.unique(parts[offs + 1 >= end[parts]]).tolist():
        todo.discard(p)  # its last offset was reached
    if not keep.all():
        msgs = list(compress(msgs, keep.tolist()))
        parts, offs = parts[keep], offs[keep]
    if msgs:
        cols.add_messages([m.key() for m in msgs], [m.value() for m in msgs], parts, offs)


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
        uids, items, etypes, ts = (batch.column(i).to_pylist() for i in range(4))
        for uid in set(uids).difference(placed):
            placed[uid] = key_partition(uid.encode(), partitions, partitioner)
        cols.add_rows(uids, items, etypes, ts, [placed[u] for u in uids], np.full(len(uids), -1, np.int64))
    return cols.history(str(path))
