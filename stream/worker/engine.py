"""The batch path of the worker, free of Faust and Kafka: records in, one ONNX Runtime
call, state values, vector messages and dead letters out.

The worker's pipeline (pipeline.py) feeds it the batches of feed.py; tests and
benchmarks feed it directly. State is reached through `StateStore`, so the same code
runs on the Faust table (RocksDB + changelog) and on a dict.

Forgetting a user. A tombstone (a record with a null value) keyed by a user id erases
the user: the state becomes an *erased marker* (state.py: the tombstone's partition and
offset, no behaviour) written to RocksDB and the changelog, and a tombstone (key = user
id, value null) is published on the vector topic (and the latest-vector topic), after
the vectors that came before it. Within one batch, in the input partition's order:
events before the tombstone are applied and their vectors published, then erased (their
state is never stored); events after it start from a fresh state (seq 1, as if the user
were new). So what is published does not depend on where the batches are cut.

Why a marker and not nothing: the batch's events are acked only after its states are
stored. A crash in between brings the batch back; with no state left, events before the
tombstone would be applied again and bring the user back. The marker's offset makes them
replays, as a state's offset does; a re-delivered tombstone is a replay too (idempotent).
Once the tombstone's offset is committed nothing before it can come back, and the worker
deletes the marker (pipeline.py, `Pipeline.drop_markers`), so the user id leaves the
table and, compacted, the changelog; until then the user's next event replaces it. A
marker a crash left behind expires with the state TTL (`state_ttl_ms`) like an idle
state (its event time is the worker's watermark when it was written), or stays, key and
40 bytes, until the user's next event when there is no TTL. A tombstone for a user
without state on its partition does nothing (`clickvec forget` writes one to every
partition by default).

State TTL (`state_ttl_ms` > 0, event time): each batch asks the store for at most
`ttl_scan` stored values (a cursor per RocksDB partition, table.py) whose last event time
is older than the watermark (the largest event time this worker has seen) minus the TTL,
and deletes them like a forget, except that an expired marker publishes nothing. A user
evicted by the TTL gets a tombstone on the vector topic as a forgotten one does: its
next event starts again at seq 1, and a tombstone tells readers to drop what they hold,
so that seq 1 is not mistaken for a replay.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clickvec.contract.events import EventError, parse_core_many, parse_event
from clickvec.contract.messages import DeadLetter, dead_letter_key
from clickvec.contract.registry import WireSettings
from clickvec.stream.worker.calls import Event, call_plan, run_calls
from clickvec.stream.worker.state import (
    StateError,
    UserState,
    erased_marker,
    is_erased,
    last_ts_of,
    marker_position,
    model_id_prefix,
    unpack_states,
)
from clickvec.stream.worker.store import MemoryStateStore, PendingStates, Record, StateStore

log = logging.getLogger(__name__)

# Record and the stores live in store.py; importing them from here keeps working.
__all__ = ["BatchResult", "Engine", "EngineConfig", "MemoryStateStore", "PendingStates", "Record", "StateStore",
           "records_from"]

EMIT_POLICIES = ("every", "latest")


@dataclass(slots=True)
class BatchResult:
    # (key, value) to the vector topic; value None: a tombstone (user forgotten or expired)
    outputs: list[tuple[bytes, bytes | None]] = field(default_factory=list)
    dead: list[tuple[bytes | None, bytes, str]] = field(default_factory=list)  # (key, value, reason)
    # to write after outputs are delivered; value None: delete the user's state
    states: list[tuple[str, bytes | None, Record]] = field(default_factory=list)
    # to the latest-vector topic (EngineConfig.latest): each user's last output of the batch
    latest: dict[bytes, bytes | None] = field(default_factory=dict)
    applied: int = 0
    replayed: int = 0
    users: int = 0
    state_resets: int = 0
    infer_s: float = 0.0
    event_ts: list[int] = field(default_factory=list)  # event time of each applied event
    forgotten: int = 0  # tombstones applied
    evicted: int = 0  # states and markers deleted by the TTL


_Item = tuple[Event | None, Record]  # an event, or (None, tombstone)


def _after(rec: Record, partition: int, offset: int) -> bool:
    """Whether `rec` is new after the last record applied, (partition, offset): a record
    of the same partition at or below that offset is a replay."""
    return rec.partition != partition or rec.offset > offset


@dataclass(slots=True)
class _Plan:
    """One user's part of a batch (Engine._plan)."""

    uid: str
    raw: bytes | None  # the stored value
    start: UserState  # what the first segment applies to
    # events between tombstones, each with the tombstone that ends it (None: the last)
    segments: list[tuple[list[tuple[Event, Record]], Record | None]]
    erased: bool = False  # a tombstone of the batch erased something


@dataclass(frozen=True)
class EngineConfig:
    emit: str = "every"  # "every": a vector after each event; "latest": one per user per batch
    encoding: str = "json"  # vector encoding: json | f16 | i8 | avro (through wire.registry)
    state_dtype: str = "f32"  # f32 | f16
    # Users per ONNX Runtime call. The step graph's surprise is a softmax over the whole
    # catalogue, whose cost per user grows once a call holds more users than this on CPU
    # (benchmarks/README.md): a larger batch runs as several calls.
    max_call_batch: int = 128
    latest: bool = False  # fill BatchResult.latest (a latest-vector topic is configured)
    state_ttl_ms: int = 0  # event time a user may stay idle before its state is deleted; 0: forever
    ttl_scan: int = 1000  # stored values examined per batch for the TTL
    # How events and keys are read, and the registry for Avro vectors (its out_format is
    # `encoding`); what dead letters keep of the message (DLQ_PAYLOAD_POLICIES).
    wire: WireSettings = WireSettings()
    dlq_payload: str = "full"


class Engine:
    def __init__(self, bundle: Any, config: EngineConfig | None = None) -> None:
        self.bundle = bundle
        self.cfg = config or EngineConfig()
        if self.cfg.emit not in EMIT_POLICIES:
            raise ValueError(f"emit policy must be one of {EMIT_POLICIES}, got {self.cfg.emit!r}")
        self.spec = bundle.spec
        self.layers = int(bundle.layers)
        self.hidden = int(bundle.hidden)
        self.model_id = str(bundle.model_id)
        self.prefix = model_id_prefix(self.model_id)
        self.watermark = -1  # the largest event time seen (the state TTL's clock)
        self._reader: Any = None  # the contract's EventReader, for formats other than JSON keyed by user id
        self.encode_vector = self._wire_setup()  # the vector encoder for encodings other than json

    def _wire_setup(self) -> Any:
        """Choose, once, how events are read and non-JSON vectors written: JSON events
        keyed by the user id keep `_parse` below; other formats and key modes go through
        the contract's `EventReader`. Returns the vector encoder for `encoding` != json."""
        import dataclasses

        from clickvec.contract.registry import EventReader, VectorAvroWriter, registry_client

        enc = self.cfg.encoding
        wire = dataclasses.replace(self.cfg.wire, out_format=enc)
        wire.check()
        client = registry_client(wire) if wire.uses_registry() else None
        if not wire.is_default():
            reader = self._reader = EventReader(wire, client)
            self._parse = functools.partial(self._parse_wire, reader)  # type: ignore[method-assign]
        if enc == "avro":
            return VectorAvroWriter(client, wire.out_topic)
        return lambda msg: msg.to_bytes(enc)

    # ------------------------------------------------------------------ parsing
    def _parse(self, rec: Record, result: BatchResult) -> Event | None:
        try:
            ev = parse_event(rec.value)
        except EventError as e:
            self._dead(rec, e.reason, e.detail, result)
            return None
        return self._keyed(rec, (ev.user_id, ev.item_id, ev.event_type, ev.ts), result)

    def _keyed(self, rec: Record, ev: Event, result: BatchResult) -> Event | None:
        key = rec.key.decode("utf-8", "replace") if rec.key is not None else None
        if key != ev[0]:
            # State lives on the partition of the key; an event keyed otherwise would be
            # applied on the wrong partition's state.
            self._dead(rec, "key_mismatch",
                       f"message key {key!r} is not the event's user_id {ev[0]!r}; "
                       "key the source topic by user_id", result)
            return None
        return ev

    def _parse_wire(self, reader: Any, rec: Record, result: BatchResult) -> Event | None:
        """`_parse` for the other formats and key modes (clickvec.contract.registry)."""
        try:
            ev = reader.event(rec.key, rec.value, rec.topic)
        except EventError as e:
            self._dead(rec, e.reason, e.detail, result)
            return None
        return ev.user_id, ev.item_id, ev.event_type, ev.ts

    def _dead(self, rec: Record, reason: str, detail: str, result: BatchResult) -> None:
        payload = self.cfg.dlq_payload
        dl = DeadLetter.of(reason, detail, rec.topic, rec.partition, rec.offset, rec.key, rec.value, payload)
        log.warning("dead-lettered %s[%d] offset=%d: %s: %s", rec.topic, rec.partition, rec.offset, reason, dl.detail)
        # The message key is capped as the letter is (DEAD_LETTER_MAX_BYTES says why).
        result.dead.append((dead_letter_key(rec.key, payload), dl.to_bytes(), reason))

    # ------------------------------------------------------------------ the batch
    def process(self, records: Sequence[Record], store: StateStore) -> BatchResult:
        """Apply a batch: events, tombstones (the module docstring), then the TTL's share."""
        result = BatchResult()
        per_user = self._group(records, result)
        raws = store.get_many([(uid, items[0][1]) for (uid, _), items in per_user.items()])
        # The common stored value (a float32 state of this model) unpacked for all users at once.
        known = unpack_states([r for r in raws if r is not None], self.prefix, self.layers, self.hidden)
        it = iter(known)
        starts = [next(it) if r is not None else None for r in raws]
        # Round 0's users are gathered here directly; a user with one new event and a
        # stored state of the common kind (most users of a batch) needs no `_Plan`.
        users: list[str] = []
        states: list[UserState] = []
        pending: list[list[tuple[Event, Record]]] = []
        keep: list[bool] = []
        plans: list[_Plan] = []  # users with a tombstone: later rounds and forgets
        for ((uid, _), items), raw, st in zip(per_user.items(), raws, starts, strict=True):
            if st is not None and len(items) == 1:
                rec = items[0][1]
                if items[0][0] is not None and _after(rec, st.partition, st.offset):
                    users.append(uid)
                    states.append(st)
                    pending.append(items)  # type: ignore[arg-type]
                    keep.append(True)
                    continue
            p = self._plan(uid, items, raw, st, result)
            if p is None:
                continue
            events, tomb = p.segments[0]
            if events:
                users.append(uid)
                states.append(p.start)
                pending.append(events)
                keep.append(tomb is None)  # only the user's last segment is stored: earlier ones are erased
            if tomb is not None:
                plans.append(p)
        if users:
            self._call(users, states, pending, keep, store, result)
        result.users = len(users)
        # Round r runs every user's r-th segment (the events between two of its
        # tombstones); a user's tombstone is published after the vectors before it and
        # before those after it. Almost every batch has round 0 only.
        for p in plans:
            self._forget(p, 0, result)
        for r in range(1, max((len(p.segments) for p in plans), default=0)):
            users, states, pending, keep = [], [], [], []
            for p in plans:
                if r < len(p.segments) and p.segments[r][0]:
                    events, tomb = p.segments[r]
                    users.append(p.uid)
                    states.append(self._fresh_after(p.segments[r - 1][1]))
                    pending.append(events)
                    keep.append(tomb is None)
            if users:
                self._call(users, states, pending, keep, store, result)
            for p in plans:
                if r < len(p.segments) and p.segments[r][1] is not None:
                    self._forget(p, r, result)
        self._expire(store, result, per_user)
        return result

    def _group(self, records: Sequence[Record], result: BatchResult) -> dict[tuple[str, int], list[_Item]]:
        """Each (user, partition)'s events and tombstones, in the batch's order; bad
        records dead-lettered. A user's state lives on one partition, that of its key;
        `clickvec forget` may send its tombstone to every partition, and those on the
        other partitions must not cut the user's events."""
        per_user: dict[tuple[str, int], list[_Item]] = {}
        wm = self.watermark
        # JSON keyed by user id: the whole batch's values parsed in one call; what it
        # refuses is parsed again by `_parse`, for the dead letter's reason.
        cores = parse_core_many([r.value for r in records]) if self._reader is None else [None] * len(records)
        get = per_user.get
        for rec, ev in zip(records, cores, strict=True):
            if ev is None:  # a tombstone, a value to parse with the wire settings, or a bad one
                if rec.value is None:
                    uid = self._tombstone_user(rec, result)
                    if uid is not None:
                        per_user.setdefault((uid, rec.partition), []).append((None, rec))
                    continue
                ev = self._parse(rec, result)
            elif rec.key is None or rec.key.decode("utf-8", "replace") != ev[0]:
                ev = self._keyed(rec, ev, result)  # dead-lettered
            if ev is None:
                continue
            k = (ev[0], rec.partition)
            items = get(k)
            if items is None:
                per_user[k] = [(ev, rec)]
            else:
                items.append((ev, rec))
            if ev[3] > wm:
                wm = ev[3]
        self.watermark = wm
        return per_user

    def _tombstone_user(self, rec: Record, result: BatchResult) -> str | None:
        """The user a tombstone forgets: the one its key names."""
        if self._reader is not None:
            try:
                return self._reader.user_of_key(rec.key, rec.topic)  # type: ignore[no-any-return]
            except EventError as e:
                self._dead(rec, e.reason, e.detail, result)
                return None
        if not rec.key:
            self._dead(rec, "empty_message", "a tombstone (null value) needs the user id as its key", result)
            return None
        return rec.key.decode("utf-8", "replace")

    def _start_state(self, uid: str, raw: bytes | None, result: BatchResult) -> tuple[UserState, bool]:
        """The state a user's events apply to, and whether it is the stored one (an
        erased marker counts: its offset must keep skipping replays)."""
        if raw is not None and is_erased(raw):
            partition, offset = marker_position(raw)
            return self._fresh(partition, offset), True
        st = None
        if raw is not None:
            try:
                st = UserState.unpack(raw, self.layers, self.hidden)
            except StateError as e:
                log.error("user %r: unreadable state (%s); starting from a fresh state", uid, e)
        if st is not None and st.model_prefix == self.prefix:
            return st, True
        if st is None:
            return UserState.fresh(self.prefix, self.layers, self.hidden), False
        result.state_resets += 1
        return UserState(self.prefix, st.seq, st.partition, st.offset, -1,
                         np.zeros((self.layers, self.hidden), np.float32),
                         np.zeros((self.layers, self.hidden), np.float32)), False

    def _fresh(self, partition: int, offset: int) -> UserState:
        z = np.zeros((self.layers, self.hidden), np.float32)
        return UserState(self.prefix, 0, partition, offset, -1, z, z.copy())

    def _fresh_after(self, tomb: Record | None) -> UserState:
        assert tomb is not None  # a segment after the first follows a tombstone
        return self._fresh(tomb.partition, tomb.offset)

    def _plan(self, uid: str, items: list[_Item], raw: bytes | None, known: UserState | None,
              result: BatchResult) -> _Plan | None:
        """What the batch does to one user (`raw` its stored value, `known` that value
        unpacked when it is the common case): its new items cut into segments at its
        tombstones; None when all of them are replays."""
        if known is not None:  # (one new event on it is planned in `process`)
            st, stored_ok = known, True
        else:
            st, stored_ok = self._start_state(uid, raw, result)
        # Replays against the stored state *and* within the batch: a record can come
        # twice in one batch (read back over a hole and also delivered by the consumer
        # after it seeks back); only offsets beyond the last applied one are new.
        new: list[_Item] = []
        last_p, last_o = st.partition, st.offset
        for ev, rec in items:
            if not _after(rec, last_p, last_o):
                continue
            new.append((ev, rec))
            last_p, last_o = rec.partition, rec.offset
        result.replayed += len(items) - len(new)
        if not new:
            if stored_ok and raw is not None:
                # Only replays: these events were applied before a crash or rebalance, and
                # their outputs delivered, but Faust sends changelog records asynchronously:
                # a SIGKILL can lose the last ones while RocksDB kept the state. Offsets are
                # committed only after the changelog is flushed, so the events come back:
                # write the stored value again and the changelog catches up (same bytes,
                # so the table itself does not change).
                result.states.append((uid, raw, items[-1][1]))
            return None
        segments: list[tuple[list[tuple[Event, Record]], Record | None]] = []
        cur: list[tuple[Event, Record]] = []
        for ev, rec in new:
            if ev is None:
                segments.append((cur, rec))
                cur = []
            else:
                cur.append((ev, rec))
        if cur or not segments:
            segments.append((cur, None))
        return _Plan(uid, raw, st, segments)

    def _forget(self, plan: _Plan, r: int, result: BatchResult) -> None:
        """The tombstone after `plan`'s r-th segment. When it erases something (a stored
        state, or events of this batch): output tombstones, and, once nothing follows it
        in the batch, the erased marker as the user's state. A tombstone for a user
        without state (never seen, expired, already erased, or whose state lives on
        another partition) does nothing."""
        tomb = plan.segments[r][1]
        assert tomb is not None
        had = bool(plan.segments[r][0]) or (r == 0 and plan.raw is not None and not is_erased(plan.raw))
        if had:
            key = plan.uid.encode()
            result.outputs.append((key, None))
            if self.cfg.latest:
                result.latest[key] = None
            result.forgotten += 1
            plan.erased = True
        if r == len(plan.segments) - 1 and plan.erased:
            ts = max(self.watermark, (last_ts_of(plan.raw) if plan.raw is not None else None) or -1)
            result.states.append((plan.uid, erased_marker(self.prefix, tomb.partition, tomb.offset, ts), tomb))

    def _expire(self, store: StateStore, result: BatchResult, per_user: dict[tuple[str, int], Any]) -> None:
        """The TTL's share of the batch: delete what the store found idle for too long
        (not the batch's own users, whose stored values this batch replaces)."""
        ttl = self.cfg.state_ttl_ms
        if ttl <= 0 or self.watermark < 0:
            return
        active = {uid for uid, _ in per_user}
        for uid, partition, value in store.expired(self.watermark - ttl, self.cfg.ttl_scan):
            if uid in active:
                continue
            result.states.append((uid, None, Record(uid.encode(), None, "", partition, -1)))
            result.evicted += 1
            if not is_erased(value):  # a marker's tombstones were published when it was written
                key = uid.encode()
                result.outputs.append((key, None))
                if self.cfg.latest:
                    result.latest[key] = None

    def _call(self, users: list[str], states: list[UserState], pending: list[list[tuple[Event, Record]]],
              keep: list[bool], store: StateStore, result: BatchResult) -> None:
        """The round's ONNX Runtime calls (calls.py): users sorted by their number of
        events, at most `max_call_batch` a call."""
        run_calls(self, call_plan([len(p) for p in pending], max(1, self.cfg.max_call_batch)), users, states, pending,
                  keep, result)

    def commit_states(self, result: BatchResult, store: StateStore) -> None:
        """Write the batch's states. Call only after its outputs were delivered: a state
        that is stored implies its vectors reached the topic."""
        store.put_many(result.states)


def records_from(items: Iterable[tuple[bytes | None, bytes | None, int, int]], topic: str = "clicks") -> list[Record]:
    """Helper for tests and benchmarks: (key, value, partition, offset) tuples -> Records."""
    return [Record(k, v, topic, p, o) for k, v, p, o in items]
