"""The worker's batch path without a broker: batching invariance, replay skipping,
state layout. (The same code runs on the real broker in test_stream_e2e.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from clickvec.bundle.reader import load_bundle
from clickvec.contract.messages import (
    VectorMessage,
    vector_json_batch,
    vector_json_head,
    vector_json_many,
    vector_json_rows,
    vector_json_source,
)
from clickvec.devtools.synth import SynthConfig, generate_events
from clickvec.features import gap_bucket, gap_bucket_array
from clickvec.stream.worker.calls import MERGE_CELLS, call_plan
from clickvec.stream.worker.engine import (
    Engine,
    EngineConfig,
    MemoryStateStore,
    PendingStates,
    Record,
)
from clickvec.stream.worker.state import (
    HEADER_BYTES,
    StateError,
    UserState,
    erased_marker,
    pack_states,
    unpack_states,
)


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
    # Many users packed at once (the engine's path) give each user's own `pack` bytes.
    rng = np.random.default_rng(1)
    L, B, H = 2, 5, 7
    h, c = rng.standard_normal((2, L, B, H)).astype(np.float32)
    heads = [(b + 1, b % 3, 10 * b, 1_700_000_000_000 + b) for b in range(B)]
    for dtype in ("f32", "f16"):
        each = [UserState(b"\x02" * 8, *heads[b], h[:, b], c[:, b]).pack(dtype) for b in range(B)]
        assert pack_states(b"\x02" * 8, heads, h, c, dtype) == each


def test_array_gap_buckets_agree_with_the_scalar_definition():
    rng = np.random.default_rng(2)
    prev = rng.integers(-1, 2_000_000_000_000, 5000)
    # Gaps of every scale, exact powers of two seconds (bucket edges) among them.
    gaps = np.concatenate([rng.integers(-5000, 10**10, 4000),
                           1000 * (2 ** rng.integers(0, 25, 1000) - 1) + rng.integers(-1, 2, 1000)])
    ts = prev + gaps
    got = gap_bucket_array(ts, prev)
    want = [gap_bucket(t, p) for t, p in zip(ts.tolist(), prev.tolist(), strict=True)]
    assert got.tolist() == want


def test_calls_sort_users_by_length_and_cut_where_padding_would_cost():
    lengths = [1, 3, 1, 2, 1, 1, 5, 2] * 40
    calls = call_plan(lengths, 128)
    assert sorted(i for c in calls for i in c) == list(range(len(lengths)))
    assert all(len(c) <= 128 for c in calls)
    cells = sum(len(c) * max(lengths[i] for i in c) for c in calls)
    assert cells <= sum(lengths) + len(calls) * MERGE_CELLS


def test_states_unpacked_at_once_agree_with_unpack():
    rng = np.random.default_rng(3)
    L, H, prefix = 2, 7, b"\x03" * 7 + b"\x00"
    states = [UserState(prefix, k + 1, k % 4, 100 + k, 1_700_000_000_000 + k,
                        *rng.standard_normal((2, L, H)).astype(np.float32)) for k in range(6)]
    values = [st.pack() for st in states]
    values[1] = states[1].pack("f16")  # another dtype
    values[2] = b"\x00" + values[2][1:]  # a bad header
    values[3] = UserState(b"\x04" * 8, 1, 0, 0, 0, states[3].h, states[3].c).pack()  # another model
    values.append(erased_marker(prefix, 1, 2, 3))
    got = unpack_states(values, prefix, L, H)
    assert [g is not None for g in got] == [True, False, False, False, True, True, False]
    for g, v in zip(got, values, strict=True):
        if g is not None:
            want = UserState.unpack(v, L, H)
            assert (g.model_prefix, g.seq, g.partition, g.offset, g.last_ts) == (
                want.model_prefix, want.seq, want.partition, want.offset, want.last_ts)
            assert np.array_equal(g.h, want.h) and np.array_equal(g.c, want.c)


def test_json_vectors_of_a_batch_are_the_contract_bytes(bundle, events):
    """The engine writes a call's JSON vectors in one `vector_json_batch` (users of
    several lengths, so padded calls too): each is byte for byte the message
    `VectorMessage.to_bytes` writes from the same fields; and the batch writer equals the
    per-user one on non-finite surprises."""
    engine = Engine(bundle)
    res = engine.process(_records(events)[:300], MemoryStateStore())
    assert len(res.outputs) == 300
    for _, v in res.outputs:
        m = VectorMessage.from_bytes(v)
        want = VectorMessage(m.user_id, m.model_id, m.seq, m.event_ts, m.emit_ts,
                             np.asarray(m.vector, np.float32), m.surprise, m.source)
        assert want.to_bytes("json") == v
    rows = vector_json_rows(np.arange(8, dtype=np.float32).reshape(4, 2) / 3)
    sur = [0.5, float("nan"), float("inf"), -float("inf")]
    src = [vector_json_source("clicks", 1, k) for k in range(4)]
    head = vector_json_head("u\u00e9", "m")
    assert vector_json_batch([head] * 4, [3, 4, 5, 6], [10, 11, 12, 13], 99, rows, sur, src) == vector_json_many(
        head, 3, [10, 11, 12, 13], 99, rows, sur, src)
