"""The engine's ONNX Runtime calls for one round of a batch (engine.py): users sorted by
their number of new events into calls of at most `max_call_batch` users, each call's
inputs built as whole arrays, and its outputs turned into vector messages and stored
states as whole arrays too.

Why sorted: a call's inputs are (T, B), T being its longest user's count of events, and
the step graph computes every cell, padding included, at a cost per cell (the surprise,
a softmax over the whole catalogue, dominates). A batch of 1,024 events from 2,000 users
holds ~800 users, most with one event and a few with 3-5: taken in arrival order, nearly
every call of 128 users had T = 3-5, so most cells were padding (benchmarks/README.md,
round 4). Sorted, almost every call has T = 1 or 2 and no padding. A call ends where the
length grows, unless that adds at most `MERGE_CELLS` padding cells: a call's fixed cost
is about that many cells.

Why whole arrays: per event, the Python work around the model (indexing numpy cells one
by one, one orjson call and one string per vector, one state packed per user) cost more
than the model did."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from clickvec.contract.messages import (
    VectorMessage,
    vector_json_batch,
    vector_json_head,
    vector_json_many,
    vector_json_rows,
    vector_json_source,
)
from clickvec.features import PAD, gap_bucket_array
from clickvec.stream.worker.state import pack_states

if TYPE_CHECKING:
    from clickvec.stream.worker.engine import BatchResult, Engine
    from clickvec.stream.worker.state import UserState
    from clickvec.stream.worker.store import Record

Event = tuple[str, str, str, int]  # (user_id, item_id, event_type, ts): what the engine uses of an event
MERGE_CELLS = 16


def call_plan(lengths: list[int], max_users: int) -> list[list[int]]:
    """Indices into `lengths`, cut into calls (see the module docstring)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    calls: list[list[int]] = []
    cur: list[int] = []
    t = 0
    for i in order:
        n = lengths[i]
        if cur and (len(cur) >= max_users or (n > t and len(cur) * (n - t) > MERGE_CELLS)):
            calls.append(cur)
            cur = []
        cur.append(i)
        t = n
    if cur:
        calls.append(cur)
    return calls


def _inputs(engine: Engine, idx: list[int], states: list[UserState], pending: list[list[tuple[Event, Record]]]
            ) -> tuple[np.ndarray, ...]:
    """(T, B) items, event types and gaps, (B,) lengths, (L, B, H) h and c of one call."""
    lens = [len(pending[i]) for i in idx]
    B, T = len(idx), max(lens)
    evs = [ev for i in idx for ev, _ in pending[i]]
    _, item_ids, type_ids, ts = zip(*evs, strict=True)
    n = len(evs)
    spec = engine.spec
    flat_items = np.fromiter(spec.item_indices(item_ids), np.int64, n)
    flat_types = np.fromiter(spec.type_indices(type_ids), np.int64, n)
    flat_ts = np.fromiter(ts, np.int64, n)
    first_prev = np.fromiter((states[i].last_ts for i in idx), np.int64, B)
    lengths = np.asarray(lens, np.int32)
    if n == B * T:  # no padding: (B, T) in user-major order
        items, types, tss = flat_items.reshape(B, T), flat_types.reshape(B, T), flat_ts.reshape(B, T)
        mask = None
    else:
        mask = np.arange(T)[None, :] < lengths[:, None]  # (B, T), True on real cells, in `evs` order
        items, types, tss = (np.zeros((B, T), np.int64) for _ in range(3))
        items[mask], types[mask], tss[mask] = flat_items, flat_types, flat_ts
    prev = np.empty_like(tss)
    prev[:, 0] = first_prev
    prev[:, 1:] = tss[:, :-1]
    gaps = gap_bucket_array(tss, prev)
    if mask is not None:
        gaps[~mask] = PAD
    h = np.array([states[i].h for i in idx], np.float32).transpose(1, 0, 2)
    c = np.array([states[i].c for i in idx], np.float32).transpose(1, 0, 2)
    return items.T, types.T, gaps.T, lengths, h, c


def run_calls(engine: Engine, calls: list[list[int]], users: list[str], states: list[UserState],
              pending: list[list[tuple[Event, Record]]], keep: list[bool], result: BatchResult) -> None:
    """The round's ONNX Runtime calls (`calls`: `call_plan`'s indices): every call's inputs,
    then the calls back to back, then each call's vectors to `result.outputs` (and
    `latest`) and new states to `result.states` (those `keep` says to store).

    Back to back, not each call followed by its Python work: the engine alone then costs
    about a fifth less CPU per event, ONNX Runtime itself about a tenth less
    (benchmarks/README.md, round 5), most likely because the model's weights (the item
    embedding and the catalogue's output layer, about a megabyte) stay in the CPU's
    caches from one call to the next."""
    inputs = [_inputs(engine, idx, states, pending) for idx in calls]
    step = engine.bundle.step
    t0 = time.perf_counter()
    outs = [step(*inp) for inp in inputs]
    result.infer_s += time.perf_counter() - t0
    for idx, inp, out in zip(calls, inputs, outs, strict=True):
        _finish(engine, idx, inp[0].shape[1], inp[3], out, users, states, pending, keep, result)


def _finish(engine: Engine, idx: list[int], B: int, lengths: np.ndarray, out: tuple[np.ndarray, ...],
            users: list[str], states: list[UserState], pending: list[list[tuple[Event, Record]]],
            keep: list[bool], result: BatchResult) -> None:
    """One call's outputs: vectors, events' times and the new states to `result`."""
    h_new, c_new, z_seq, z_last, surprise = out
    now_ms = int(time.time() * 1000)
    cfg = engine.cfg
    every = cfg.emit == "every"
    outputs = result.outputs
    latest = result.latest if cfg.latest else None
    json_every = cfg.encoding == "json" and every  # the default
    if json_every:  # every event's vector, one writer call for the whole call; it gives the events' times
        result.event_ts.extend(_json_every(engine, idx, users, states, pending, z_seq, surprise, lengths, now_ms,
                                           outputs, latest))
    elif cfg.encoding == "json":
        rows = vector_json_rows(np.ascontiguousarray(z_last, np.float32).reshape(-1, z_last.shape[-1]))
        _json_latest(engine, idx, users, states, pending, rows, surprise.T.tolist(), now_ms, outputs, latest)
    else:
        _encoded_outputs(engine, idx, users, states, pending, z_seq if every else z_last, surprise.T.tolist(),
                         every, now_ms, outputs, latest)
    applied = 0
    kept: list[int] = []
    heads: list[tuple[int, int, int, int]] = []
    for b, i in enumerate(idx):
        evs = pending[i]
        n = len(evs)
        applied += n
        if not json_every:
            result.event_ts.extend(ev[3] for ev, _ in evs)
        if keep[i]:  # else: erased by a tombstone later in the batch
            last_ev, last_rec = evs[-1]
            kept.append(b)
            heads.append((states[i].seq + n, last_rec.partition, last_rec.offset, last_ev[3]))
    result.applied += applied
    if kept:
        sel = kept if len(kept) < B else slice(None)
        packed = pack_states(engine.prefix, heads, h_new[:, sel], c_new[:, sel], cfg.state_dtype)
        add = result.states.append
        for b, value in zip(kept, packed, strict=True):
            i = idx[b]
            add((users[i], value, pending[i][-1][1]))


def _json_every(engine: Engine, idx: list[int], users: list[str], states: list[UserState],
                pending: list[list[tuple[Event, Record]]], z_seq: np.ndarray, surprise: np.ndarray,
                lengths: np.ndarray, now_ms: int, outputs: list[tuple[bytes, bytes | None]],
                latest: dict[bytes, bytes | None] | None) -> list[int]:
    """The JSON vector of every event of the call, in the users' order (`idx`), each
    user's in its events' order: the real cells of (T, B) taken user-major as whole
    arrays, then one `vector_json_batch`. Returns the events' times, in that order."""
    T, B = surprise.shape
    zt, st = z_seq.transpose(1, 0, 2), surprise.T  # (B, T, D), (B, T)
    if int(lengths.sum()) == B * T:
        z, sur = zt.reshape(B * T, -1), st.ravel().tolist()
    else:
        mask = np.arange(T)[None, :] < lengths[:, None]
        z, sur = zt[mask], st[mask].tolist()
    rows = vector_json_rows(np.ascontiguousarray(z, np.float32))
    model_id = engine.model_id
    heads: list[str] = []
    seqs: list[int] = []
    ts: list[int] = []
    srcs: list[str] = []
    keys: list[bytes] = []
    for i in idx:
        uid = users[i]
        head, key, seq = vector_json_head(uid, model_id), uid.encode(), states[i].seq
        for ev, r in pending[i]:
            seq += 1
            heads.append(head)
            keys.append(key)
            seqs.append(seq)
            ts.append(ev[3])
            srcs.append(vector_json_source(r.topic, r.partition, r.offset))
    msgs = vector_json_batch(heads, seqs, ts, now_ms, rows, sur, srcs)
    outputs.extend(zip(keys, msgs, strict=True))
    if latest is not None:
        latest.update(zip(keys, msgs, strict=True))  # a user's last vector is its last in the call
    return ts


def _json_latest(engine: Engine, idx: list[int], users: list[str], states: list[UserState],
                 pending: list[list[tuple[Event, Record]]], rows: list[str], sur: list[list[float]],
                 now_ms: int, outputs: list[tuple[bytes, bytes | None]],
                 latest: dict[bytes, bytes | None] | None) -> None:
    """`emit` latest: each user's vector after its last event of the call."""
    model_id = engine.model_id
    for b, i in enumerate(idx):
        evs = pending[i]
        n = len(evs)
        uid = users[i]
        key = uid.encode()
        ev, r = evs[-1]
        msgs = vector_json_many(vector_json_head(uid, model_id), states[i].seq + n, [ev[3]], now_ms, [rows[b]],
                                sur[b][n - 1:n], [vector_json_source(r.topic, r.partition, r.offset)])
        outputs.extend((key, m) for m in msgs)
        if latest is not None:
            latest[key] = msgs[-1]


def _encoded_outputs(engine: Engine, idx: list[int], users: list[str], states: list[UserState],
                     pending: list[list[tuple[Event, Record]]], z: np.ndarray, sur: list[list[float]], every: bool,
                     now_ms: int, outputs: list[tuple[bytes, bytes | None]],
                     latest: dict[bytes, bytes | None] | None) -> None:
    """Vectors in the other encodings (f16, i8, Avro), one `VectorMessage` each."""
    zs: Any = z.tolist()
    model_id, encode = engine.model_id, engine.encode_vector
    for b, i in enumerate(idx):
        evs = pending[i]
        n = len(evs)
        uid = users[i]
        key = uid.encode()
        st = states[i]
        todo = enumerate(evs) if every else [(n - 1, evs[-1])]
        for t, (ev, rec) in todo:
            vec = zs[t][b] if every else zs[b]
            msg = VectorMessage(uid, model_id, st.seq + t + 1, ev[3], now_ms, vec, sur[b][t],
                                f"{rec.topic}[{rec.partition}]@{rec.offset}")
            outputs.append((key, encode(msg)))
        if latest is not None:
            latest[key] = outputs[-1][1]
