"""The batch path of the worker, free of Faust and Kafka: records in, one ONNX Runtime
call, state values, vector messages and dead letters out.

The worker's pipeline (pipeline.py) feeds it the batches of feed.py; tests and
benchmarks feed it directly. State is reached through `StateStore`, so the same code
runs on the Faust table (RocksDB + changelog) and on a dict.
"""

from __future__ import annotations

import abc
import functools
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clickvec.contract.events import ClickEvent, EventError, parse_event
from clickvec.contract.messages import (
    DeadLetter,
    VectorMessage,
    dead_letter_key,
    vector_json,
    vector_json_head,
    vector_json_source,
)
from clickvec.contract.registry import WireSettings
from clickvec.features import gap_bucket
from clickvec.stream.worker.state import StateError, UserState, model_id_prefix

log = logging.getLogger(__name__)

EMIT_POLICIES = ("every", "latest")


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed Kafka message."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int


class StateStore(abc.ABC):
    """Where per-user state values live. `record` is the event whose partition owns the key."""

    @abc.abstractmethod
    def get(self, user_id: str, record: Record) -> bytes | None: ...

    @abc.abstractmethod
    def put(self, user_id: str, value: bytes, record: Record) -> None: ...

    def put_many(self, states: Iterable[tuple[str, bytes, Record]]) -> None:
        """Write several (user_id, value, record) states; stores that can batch writes do."""
        for user_id, value, record in states:
            self.put(user_id, value, record)


class MemoryStateStore(StateStore):
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, user_id: str, record: Record) -> bytes | None:
        return self.data.get(user_id)

    def put(self, user_id: str, value: bytes, record: Record) -> None:
        self.data[user_id] = value


class PendingStates(StateStore):
    """States of batches that are processed but not yet stored (their outputs are still
    on the way to the brokers), seen by the batches processed after them.

    `hold` makes a batch's states visible; `release` drops them once the batch's states
    are in `base` (unless a later batch has replaced them)."""

    def __init__(self, base: StateStore) -> None:
        self.base = base
        self._pending: dict[str, tuple[bytes, int]] = {}

    def get(self, user_id: str, record: Record) -> bytes | None:
        held = self._pending.get(user_id)
        return held[0] if held is not None else self.base.get(user_id, record)

    def put(self, user_id: str, value: bytes, record: Record) -> None:
        self.base.put(user_id, value, record)

    def hold(self, result: BatchResult, batch: int) -> None:
        for uid, value, _ in result.states:
            self._pending[uid] = (value, batch)

    def release(self, result: BatchResult, batch: int) -> None:
        for uid, _, _ in result.states:
            held = self._pending.get(uid)
            if held is not None and held[1] == batch:
                del self._pending[uid]

    def __len__(self) -> int:
        return len(self._pending)


@dataclass(slots=True)
class BatchResult:
    outputs: list[tuple[bytes, bytes]] = field(default_factory=list)  # (key, value) to the vector topic
    dead: list[tuple[bytes | None, bytes, str]] = field(default_factory=list)  # (key, value, reason)
    states: list[tuple[str, bytes, Record]] = field(default_factory=list)  # to write after outputs are delivered
    applied: int = 0
    replayed: int = 0
    users: int = 0
    state_resets: int = 0
    infer_s: float = 0.0
    event_ts: list[int] = field(default_factory=list)  # event time of each applied event


@dataclass(frozen=True)
class EngineConfig:
    emit: str = "every"  # "every": a vector after each event; "latest": one per user per batch
    encoding: str = "json"  # vector encoding: json | f16 | i8 | avro (through wire.registry)
    state_dtype: str = "f32"  # f32 | f16
    max_padding_ratio: float = 4.0  # above this padded/real cell ratio, split the call by length
    # Users per ONNX Runtime call. The step graph's surprise is a softmax over the whole
    # catalogue, whose cost per user grows once a call holds more users than this on CPU
    # (benchmarks/README.md): a larger batch runs as several calls.
    max_call_batch: int = 128
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
        self._encode = self._wire_setup()

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
            reader = EventReader(wire, client)
            self._parse = functools.partial(self._parse_wire, reader)  # type: ignore[method-assign]
        if enc == "avro":
            return VectorAvroWriter(client, wire.out_topic)
        return lambda msg: msg.to_bytes(enc)

    # ------------------------------------------------------------------ parsing
    def _parse(self, rec: Record, result: BatchResult) -> ClickEvent | None:
        try:
            ev = parse_event(rec.value)
        except EventError as e:
            self._dead(rec, e.reason, e.detail, result)
            return None
        key = rec.key.decode("utf-8", "replace") if rec.key is not None else None
        if key != ev.user_id:
            # State lives on the partition of the key; an event keyed otherwise would be
            # applied on the wrong partition's state.
            self._dead(rec, "key_mismatch",
                       f"message key {key!r} is not the event's user_id {ev.user_id!r}; "
                       "key the source topic by user_id", result)
            return None
        return ev

    def _parse_wire(self, reader: Any, rec: Record, result: BatchResult) -> ClickEvent | None:
        """`_parse` for the other formats and key modes (clickvec.contract.registry)."""
        try:
            return reader.event(rec.key, rec.value, rec.topic)  # type: ignore[no-any-return]
        except EventError as e:
            self._dead(rec, e.reason, e.detail, result)
            return None

    def _dead(self, rec: Record, reason: str, detail: str, result: BatchResult) -> None:
        payload = self.cfg.dlq_payload
        dl = DeadLetter.of(reason, detail, rec.topic, rec.partition, rec.offset, rec.key, rec.value, payload)
        log.warning("dead-lettered %s[%d] offset=%d: %s: %s", rec.topic, rec.partition, rec.offset, reason, dl.detail)
        # The message key is capped as the letter is (DEAD_LETTER_MAX_BYTES says why).
        result.dead.append((dead_letter_key(rec.key, payload), dl.to_bytes(), reason))

    # ------------------------------------------------------------------ the batch
    def process(self, records: Sequence[Record], store: StateStore) -> BatchResult:
        result = BatchResult()
        per_user: dict[str, list[tuple[ClickEvent, Record]]] = {}
        for rec in records:
            ev = self._parse(rec, result)
            if ev is not None:
                per_user.setdefault(ev.user_id, []).append((ev, rec))
        if not per_user:
            return result

        users: list[str] = []
        states: list[UserState] = []
        pending: list[list[tuple[ClickEvent, Record]]] = []
        for uid, evs in per_user.items():
            raw = store.get(uid, evs[0][1])
            st = None
            if raw is not None:
                try:
                    st = UserState.unpack(raw, self.layers, self.hidden)
                except StateError as e:
                    log.error("user %r: unreadable state (%s); starting from a fresh state", uid, e)
            stored_ok = st is not None and st.model_prefix == self.prefix
            if not stored_ok:
                if st is not None:
                    result.state_resets += 1
                st = UserState.fresh(self.prefix, self.layers, self.hidden) if st is None else UserState(
                    self.prefix, st.seq, st.partition, st.offset, -1,
                    np.zeros((self.layers, self.hidden), np.float32),
                    np.zeros((self.layers, self.hidden), np.float32))
            # Replays against the stored state *and* within the batch: a record can come
            # twice in one batch (read back over a hole and also delivered by the consumer
            # after it seeks back); only offsets beyond the last applied one are new.
            new = []
            last_p, last_o = st.partition, st.offset
            for ev, rec in evs:
                if rec.partition == last_p and rec.offset <= last_o:
                    continue
                new.append((ev, rec))
                last_p, last_o = rec.partition, rec.offset
            result.replayed += len(evs) - len(new)
            if new:
                users.append(uid)
                states.append(st)
                pending.append(new)
            elif stored_ok and raw is not None:
                # Only replays: these events were applied before a crash or rebalance, and
                # their outputs delivered, but Faust sends changelog records asynchronously:
                # a SIGKILL can lose the last ones while RocksDB kept the state. Offsets are
                # committed only after the changelog is flushed, so the events come back:
                # write the stored value again and the changelog catches up (same bytes,
                # so the table itself does not change).
                result.states.append((uid, raw, evs[-1][1]))
        if not users:
            return result

        lengths = np.array([len(p) for p in pending], dtype=np.int64)
        step = max(1, self.cfg.max_call_batch)
        for idx in self._chunks(lengths):
            for k in range(0, len(idx), step):
                self._run(idx[k:k + step], users, states, pending, store, result)
        result.users = len(users)
        return result

    def _chunks(self, lengths: np.ndarray) -> list[np.ndarray]:
        """One call for the whole batch unless padding would dominate; then one call per
        power-of-two length class."""
        total = int(lengths.sum())
        if int(lengths.max()) * len(lengths) <= self.cfg.max_padding_ratio * total:
            return [np.arange(len(lengths))]
        cls = np.ceil(np.log2(lengths)).astype(np.int64)
        return [np.flatnonzero(cls == k) for k in np.unique(cls)]

    def _run(
        self,
        idx: np.ndarray,
        users: list[str],
        states: list[UserState],
        pending: list[list[tuple[ClickEvent, Record]]],
        store: StateStore,
        result: BatchResult,
    ) -> None:
        B = len(idx)
        T = max(len(pending[i]) for i in idx)
        items = np.zeros((T, B), dtype=np.int64)
        etypes = np.zeros((T, B), dtype=np.int64)
        gaps = np.zeros((T, B), dtype=np.int64)
        lengths = np.empty(B, dtype=np.int32)
        h = np.empty((self.layers, B, self.hidden), dtype=np.float32)
        c = np.empty((self.layers, B, self.hidden), dtype=np.float32)
        spec = self.spec
        for b, i in enumerate(idx):
            st = states[i]
            prev = st.last_ts if st.last_ts >= 0 else None
            for t, (ev, _) in enumerate(pending[i]):
                items[t, b] = spec.item_index(ev.item_id)
                etypes[t, b] = spec.type_index(ev.event_type)
                gaps[t, b] = gap_bucket(ev.ts, prev)
                prev = ev.ts
            lengths[b] = len(pending[i])
            h[:, b] = st.h
            c[:, b] = st.c

        t0 = time.perf_counter()
        h_new, c_new, z_seq, z_last, surprise = self.bundle.step(items, etypes, gaps, lengths, h, c)
        result.infer_s += time.perf_counter() - t0

        now_ms = int(time.time() * 1000)
        enc = self.cfg.encoding
        every = self.cfg.emit == "every"
        fast = enc == "json"
        z_arr = z_seq if every else z_last
        zs_all = z_arr if fast else z_arr.tolist()  # json: rows go to orjson as float32 arrays
        sur_all = surprise.tolist()  # (T, B)
        outputs = result.outputs
        for b, i in enumerate(idx):
            st = states[i]
            evs = pending[i]
            n = len(evs)
            uid = users[i]
            key = uid.encode()
            head = vector_json_head(uid, self.model_id) if fast else ""
            todo = enumerate(evs) if every else [(n - 1, evs[-1])]
            for t, (ev, rec) in todo:
                z = zs_all[t][b] if every else zs_all[b]
                if fast:
                    outputs.append((key, vector_json(head, st.seq + t + 1, ev.ts, now_ms, z, sur_all[t][b],
                                                     vector_json_source(rec.topic, rec.partition, rec.offset))))
                else:
                    msg = VectorMessage(uid, self.model_id, st.seq + t + 1, ev.ts, now_ms, z, sur_all[t][b],
                                        f"{rec.topic}[{rec.partition}]@{rec.offset}")
                    outputs.append((key, self._encode(msg)))
            last_ev, last_rec = evs[-1]
            new_state = UserState(self.prefix, st.seq + n, last_rec.partition, last_rec.offset,
                                  last_ev.ts, h_new[:, b], c_new[:, b])
            result.states.append((uid, new_state.pack(self.cfg.state_dtype), last_rec))
            result.applied += n
            result.event_ts.extend(ev.ts for ev, _ in evs)

    def commit_states(self, result: BatchResult, store: StateStore) -> None:
        """Write the batch's states. Call only after its outputs were delivered: a state
        that is stored implies its vectors reached the topic."""
        store.put_many(result.states)


def records_from(items: Iterable[tuple[bytes | None, bytes | None, int, int]], topic: str = "clicks") -> list[Record]:
    """Helper for tests and benchmarks: (key, value, partition, offset) tuples -> Records."""
    return [Record(k, v, topic, p, o) for k, v, p, o in items]
