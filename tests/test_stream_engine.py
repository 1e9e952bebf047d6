"""The worker's batch path without a broker: batching invariance, replay skipping,
state layout. (The same code runs on the real broker in test_stream_e2e.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from clickvec.bundle.reader import load_bundle
from clickvec.contract.messages import VectorMessage
from clickvec.devtools.synth import SynthConfig, generate_events
from clickvec.stream.worker.engine import (
    Engine,
    EngineConfig,
    MemoryStateStore,
    PendingStates,
    Record,
)
from clickvec.stream.worker.state import HEADER_BYTES, StateError, UserState


@pytest.fixture(scope="module")
def bundle(stream_bundle_path):
    return load_bundle(stream_bundle_path, providers="cpu")


@pytest.fixture(scope="module")
def events():
    return generate_events(SynthConfig(n_users=60, seed=5, mean_events=12))[:600]


def _records(events):
    # Two partitions by user, offsets in arrival order per partition.
    offsets = [0, 0]
    out = []
    for e in events:
        p = hash(e.user_id) % 2
        out.append(Record(e.user_id.encode(), e.to_bytes(), "clicks", p, offsets[p]))
        offsets[p] += 1
    return out


def _run(engine, records, batch_sizes):
    store = MemoryStateStore()
    outs = []
    i = 0
    k = 0
    while i < len(records):
        n = batch_sizes[k % len(batch_sizes)]
        res = engine.process(records[i : i + n], store)
        engine.commit_states(res, store)
        outs += [VectorMessage.from_bytes(v) for _, v in res.outputs]
        i += n
        k += 1
    return outs, store


def test_batching_does_not_change_vectors(bundle, events):
    engine = Engine(bundle)
    records = _records(events)
    one_by_one, s1 = _run(engine, records, [1])
    ragged, s2 = _run(engine, records, [7, 130, 1, 33, 512])
    assert len(one_by_one) == len(ragged) == len(records)
    a = {(m.user_id, m.seq): np.asarray(m.vector, np.float32) for m in one_by_one}
    b = {(m.user_id, m.seq): np.asarray(m.vector, np.float32) for m in ragged}
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-5
    # And equal to the offline encoder.
    by_user: dict[str, list] = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    worst = 0.0
    for uid, evs in by_user.items():
        z = bundle.encode_offline(bundle.spec.encode_sequence(
            [e.item_id for e in evs], [e.event_type for e in evs], [e.ts for e in evs]))
        for n in range(1, len(evs) + 1):
            worst = max(worst, float(np.abs(b[(uid, n)] - z[n - 1]).max()))
    assert worst <= 1e-5
    assert s1.data.keys() == s2.data.keys()


def test_batches_computed_ahead_of_storage_chain_states(bundle, events):
    """The worker computes batch n+1 before batch n's states are stored: through
    `PendingStates` it must see them, and storing both in order gives the same vectors
    and states as one batch after the other."""
    engine = Engine(bundle)
    records = _records(events)
    sequential, s_seq = _run(engine, records, [100])
    base = MemoryStateStore()
    pending = PendingStates(base)
    held = []
    outs = []
    for k, i in enumerate(range(0, len(records), 100)):
        res = engine.process(records[i:i + 100], pending)
        pending.hold(res, k)
        held.append((k, res))
        outs += [VectorMessage.from_bytes(v) for _, v in res.outputs]
        if len(held) == 3:  # two batches in flight behind this one
            kk, old = held.pop(0)
            engine.commit_states(old, pending)
            pending.release(old, kk)
    for kk, old in held:
        engine.commit_states(old, pending)
        pending.release(old, kk)
    assert len(pending) == 0
    a = {(m.user_id, m.seq): m.vector for m in sequential}
    b = {(m.user_id, m.seq): m.vector for m in outs}
    assert a == b
    assert base.data == s_seq.data


def test_replayed_events_are_skipped(bundle, events):
    engine = Engine(bundle)
    records = _records(events)
    store = MemoryStateStore()
    first = engine.process(records[:300], store)
    engine.commit_states(first, store)
    before = dict(store.data)
    again = engine.process(records[:300], store)  # redelivered after a crash
    assert again.applied == 0 and again.replayed == 300 and not again.outputs
    engine.commit_states(again, store)
    assert store.data == before
    # A batch straddling the boundary applies only the new part.
    mixed = engine.process(records[250:400], store)
    assert mixed.replayed == 50 and mixed.applied == 100
    # A record twice in one batch (read back over a hole and redelivered) applies once.
    fresh = MemoryStateStore()
    doubled = engine.process(records[:50] + records[20:40], fresh)
    assert doubled.applied == 50 and doubled.replayed == 20


def test_emit_latest_one_vector_per_user_per_batch(bundle, events):
    engine = Engine(bundle, EngineConfig(emit="latest", encoding="f16"))
    records = _records(events)[:200]
    res = engine.process(records, MemoryStateStore())
    users = {r.key for r in records}
    assert len(res.outputs) == len(users)
    msgs = [VectorMessage.from_bytes(v) for _, v in res.outputs]
    assert sum(m.seq for m in msgs) == 200


def test_bad_records_go_to_dead_letters(bundle, events):
    engine = Engine(bundle)
    good = _records(events)[:10]
    bad = Record(b"u1", b"{oops", "clicks", 0, 99)
    res = engine.process([*good[:5], bad, *good[5:]], MemoryStateStore())
    assert res.applied == 10 and len(res.dead) == 1 and res.dead[0][2] == "not_json"


def test_state_layout_is_compact_and_checked(bundle):
    st = UserState.fresh(b"\x01" * 8, bundle.layers, bundle.hidden)
    st.h[:] = np.random.default_rng(0).standard_normal(st.h.shape)
    raw = st.pack()
    state_bytes = 2 * bundle.layers * bundle.hidden * 4
    assert len(raw) == HEADER_BYTES + state_bytes
    assert len(raw) <= 1.25 * state_bytes
    back = UserState.unpack(raw, bundle.layers, bundle.hidden)
    assert np.array_equal(back.h, st.h) and back.seq == 0
    half = UserState.unpack(st.pack("f16"), bundle.layers, bundle.hidden)
    assert np.allclose(half.h, st.h, atol=1e-2)
    with pytest.raises(StateError):
        UserState.unpack(raw[:-4], bundle.layers, bundle.hidden)
    with pytest.raises(StateError):
        UserState.unpack(b"\x00" + raw[1:], bundle.layers, bundle.hidden)
