"""Forgetting users, the state TTL and the latest-vector topic (issue 15, points 3-5).

The engine's semantics first, without a broker (batching invariance of tombstones,
replays after a crash, the TTL's bounded work); then one end-to-end run of the real
worker that forgets users, is killed (SIGKILL), restarts with its RocksDB wiped
(recovering from the changelog), expires idle users and publishes the latest-vector topic.
"""

from __future__ import annotations

import shutil
import time
import zlib

import numpy as np
import pytest
from stream_util import TopicReader, VectorLog, WorkerProcess, check_vectors

from clickvec import forget as forget_cmd
from clickvec.bundle.reader import load_bundle
from clickvec.contract.events import ClickEvent
from clickvec.contract.messages import VectorMessage
from clickvec.devtools.produce import produce_events
from clickvec.devtools.synth import SynthConfig, generate_events
from clickvec.stream.consumers.alerts import AlertConfig, AlertHandler
from clickvec.stream.consumers.loop import LoopConfig, Tombstone, VectorTopicLoop
from clickvec.stream.consumers.recommend import ItemIndex, RecommendHandler
from clickvec.stream.worker.engine import (
    Engine,
    EngineConfig,
    MemoryStateStore,
    PendingStates,
    Record,
)
from clickvec.stream.worker.state import HEADER_BYTES, UserState, is_erased


@pytest.fixture(scope="module")
def bundle(stream_bundle_path):
    return load_bundle(stream_bundle_path, providers="cpu")


def _partition(uid: str) -> int:
    return zlib.crc32(uid.encode()) % 2


def _offline(bundle, evs: list[ClickEvent]) -> np.ndarray:
    enc = bundle.spec.encode_sequence([e.item_id for e in evs], [e.event_type for e in evs], [e.ts for e in evs])
    return bundle.encode_offline(enc)  # (n, D)


def _with_tombstones(events: list[ClickEvent], after: dict[str, int], extra: list[str]) -> list[Record]:
    """Records on two partitions, with a tombstone after each `after` user's n-th event
    and, at the end, one for each `extra` user."""
    offsets = [0, 0]
    seen: dict[str, int] = {}
    out = []

    def add(uid: str, value: bytes | None) -> None:
        p = _partition(uid)
        out.append(Record(uid.encode(), value, "clicks", p, offsets[p]))
        offsets[p] += 1

    for e in events:
        add(e.user_id, e.to_bytes())
        seen[e.user_id] = seen.get(e.user_id, 0) + 1
        if after.get(e.user_id) == seen[e.user_id]:
            add(e.user_id, None)
    for uid in extra:
        add(uid, None)
    return out


def _per_user(outputs) -> dict[str, list]:
    got: dict[str, list] = {}
    for k, v in outputs:
        if v is None:
            got.setdefault(k.decode(), []).append("T")
        else:
            m = VectorMessage.from_bytes(v)
            got.setdefault(m.user_id, []).append((m.seq, np.asarray(m.vector, np.float32)))
    return got


def _run(engine: Engine, records: list[Record], size: int, store: MemoryStateStore | None = None,
         ahead: int = 0):
    """Batches of `size`; `ahead` batches computed before the oldest one's states are
    stored (the worker's --pipeline-depth, through PendingStates)."""
    store = store if store is not None else MemoryStateStore()
    pending = PendingStates(store)
    outputs, held = [], []
    for k, i in enumerate(range(0, len(records), size)):
        res = engine.process(records[i:i + size], pending)
        pending.hold(res, k)
        held.append((k, res))
        outputs += res.outputs
        while len(held) > ahead:
            kk, old = held.pop(0)
            engine.commit_states(old, pending)
            pending.release(old, kk)
    for kk, old in held:
        engine.commit_states(old, pending)
        pending.release(old, kk)
    assert len(pending) == 0
    return _per_user(outputs), store


def test_tombstones_in_the_engine_do_not_depend_on_batching_and_replay_idempotently(bundle):
    events = generate_events(SynthConfig(n_users=12, seed=31, mean_events=8))[:120]
    by_user: dict[str, list[ClickEvent]] = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    forgotten = [u for u, evs in by_user.items() if len(evs) >= 4][:3]
    last = [u for u in by_user if u not in forgotten][0]  # forgotten after all its events
    records = _with_tombstones(events, {u: 2 for u in forgotten}, [last, "never-seen"])
    engine = Engine(bundle)
    runs = [_run(engine, records, size, ahead=ahead) for size, ahead in ((1, 0), (5, 0), (1000, 0), (3, 2))]
    ref, store = runs[0]
    for got, other in runs[1:]:
        assert got.keys() == ref.keys() and other.data == store.data
        for uid, seq in ref.items():
            assert [x if x == "T" else x[0] for x in got[uid]] == [x if x == "T" else x[0] for x in seq], uid
            for a, b in zip(got[uid], seq, strict=True):
                if a != "T":
                    assert np.abs(a[1] - b[1]).max() <= 1e-6
    assert "never-seen" not in ref  # nothing to erase: nothing published
    for uid in forgotten:
        evs = by_user[uid]
        # events before the tombstone applied and published, then erased; after it, fresh
        assert [x if x == "T" else x[0] for x in ref[uid]] == [1, 2, "T"] + list(range(1, len(evs) - 1))
        z_before, z_after = _offline(bundle, evs[:2]), _offline(bundle, evs[2:])
        assert np.abs(np.stack([v for _, v in ref[uid][:2]]) - z_before).max() <= 1e-5
        assert np.abs(np.stack([v for _, v in ref[uid][3:]]) - z_after).max() <= 1e-5
        st = UserState.unpack(store.data[uid], bundle.layers, bundle.hidden)
        assert st.seq == len(evs) - 2
    assert ref[last][-1] == "T" and is_erased(store.data[last]) and len(store.data[last]) == HEADER_BYTES
    # A crash after the states were stored and before the ack: everything comes again.
    before = dict(store.data)
    again, store = _run(engine, records, 7, store)
    assert again == {} and store.data == before


def test_state_ttl_evicts_idle_users_a_bounded_share_per_batch(bundle):
    pool = generate_events(SynthConfig(n_users=8, seed=32, mean_events=6))
    idle = sorted({e.user_id for e in pool})[:6]
    engine = Engine(bundle, EngineConfig(state_ttl_ms=10_000, ttl_scan=2))
    store = MemoryStateStore()
    offset = 0

    def batch(evs: list[ClickEvent]):
        nonlocal offset
        recs = [Record(e.user_id.encode(), e.to_bytes(), "clicks", 0, offset + i) for i, e in enumerate(evs)]
        offset += len(evs)
        res = engine.process(recs, store)
        engine.commit_states(res, store)
        return res

    item = pool[0]
    ev = lambda uid, ts: ClickEvent(uid, item.item_id, item.event_type, 1_700_000_000_000 + ts)  # noqa: E731
    batch([ev(u, 1000 * i) for i, u in enumerate(idle)])
    assert len(store.data) == 6
    evicted = []
    for k in range(4):  # the watermark moves past the TTL: at most 2 examined per batch
        res = batch([ev("active", 100_000 + k)])
        assert res.evicted <= 2
        evicted += [key.decode() for key, v in res.outputs if v is None]
    assert sorted(evicted) == idle and set(store.data) == {"active"}
    res = batch([ev(idle[0], 100_500)])
    assert VectorMessage.from_bytes(res.outputs[0][1]).seq == 1  # expired: starts afresh


# ------------------------------------------------------------------------- end to end

TTL_S = 20


def _timed(pool: list[ClickEvent], users: list[str], per_user: int, t0: int, step_ms: int) -> list[ClickEvent]:
    """`per_user` events for each user, round robin, `step_ms` apart in event time; the
    items and event types taken from the synthetic pool."""
    out = []
    for i in range(per_user):
        for j, uid in enumerate(users):
            src = pool[(i * len(users) + j) % len(pool)]
            out.append(ClickEvent(uid, src.item_id, src.event_type, t0 + len(out) * step_ms))
    return out


def _split_at_tombstones(messages) -> tuple[list, list, dict[str, int]]:
    """Vector messages before and after each user's first tombstone, and tombstones per user."""
    before, after, tombs = [], [], {}
    for k, v in messages:
        uid = k.decode()
        if v is None:
            tombs[uid] = tombs.get(uid, 0) + 1
        else:
            (after if uid in tombs else before).append((k, v))
    return before, after, tombs


def _last_per_key(messages) -> dict:
    return dict(messages)


def _vec(v: bytes | None):
    if v is None:
        return None
    m = VectorMessage.from_bytes(v)
    return m.seq, m.vector


def _wait(reader: TopicReader, done, timeout: float, w: WorkerProcess) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reader.poll(0.3)
        if done(reader.messages):
            return
        assert w.alive(), w.log_tail()
    raise AssertionError(f"timed out with {len(reader.messages)} messages\n{w.log_tail()}")


@pytest.mark.broker
def test_forget_kill_wipe_ttl_and_latest_topic_end_to_end(kafka_bootstrap, new_topic, new_group,
                                                         stream_bundle_path, bundle, tmp_path):
    pool = generate_events(SynthConfig(n_users=20, seed=33, mean_events=10))
    users = [f"user-{i:02d}" for i in range(24)]
    forgotten, idle, active = users[:4], users[4:12], users[12:]
    t0 = 1_700_000_000_000
    phase1 = _timed(pool, users, 4, t0, 100)  # 9.6 s of event time: nobody idle for the TTL yet
    # Phase 2 (after the forget and the restart): 40 s of event time, each user every
    # 3.2 s, well within the TTL; the idle users' last events fall out of it.
    phase2 = _timed(pool[7:], forgotten + active, 12, phase1[-1].ts + 200, 200)
    src, out, dlq = new_topic(2, "clicks"), new_topic(2, "vectors"), new_topic(2, "dlq")
    latest = f"latest-{out}"
    group = new_group()
    assert produce_events(phase1, kafka_bootstrap, src) == len(phase1)
    state = tmp_path / "s"
    w = WorkerProcess(kafka_bootstrap, stream_bundle_path, src, out, dlq, group, state, tmp_path / "w.log",
                      "--state-ttl", f"{TTL_S}s", "--latest-topic", latest, "--session-timeout", "6")
    reader = TopicReader(kafka_bootstrap, out)
    w.start()
    try:
        _wait(reader, lambda m: len(m) >= len(phase1), 90, w)
        assert forget_cmd.main(["--brokers", kafka_bootstrap, "--topic", src, *forgotten]) == 0
        _wait(reader, lambda m: {k.decode() for k, v in m if v is None} >= set(forgotten), 60, w)
        # Once the tombstones' offsets are committed, the erased markers go too: the
        # changelog's last word on a forgotten user is a tombstone.
        changelog = TopicReader(kafka_bootstrap, f"{group}-user-state-changelog")
        _wait(changelog, lambda m: all(_last_per_key(m).get(u.encode(), b"") is None for u in forgotten), 30, w)
        markers = {k.decode() for k, v in changelog.messages if v is not None and is_erased(v)}
        changelog.close()
        assert markers == set(forgotten)
        w.kill()
        shutil.rmtree(state)  # the restart recovers the table from the changelog alone
        w.start()
        assert produce_events(phase2, kafka_bootstrap, src) == len(phase2)

        _wait(reader, lambda m: _progress(m, forgotten, active, idle), 120, w)
        reader.poll(1.0)
    finally:
        assert w.stop() == 0, w.log_tail()
        reader.close()
    before, after, tombs = _split_at_tombstones(reader.messages)
    # Vectors: before the tombstone as always; the forgotten users' after it start at
    # seq 1 and equal the offline encoder on the new events alone (not brought back by
    # the recovery from the changelog).
    kept = [e for e in phase1 if e.user_id not in forgotten] + [e for e in phase2 if e.user_id not in forgotten]
    check_vectors(bundle, kept + [e for e in phase1 if e.user_id in forgotten],
                  VectorLog.of(before))
    check_vectors(bundle, [e for e in phase2 if e.user_id in forgotten], VectorLog.of(after))
    assert set(tombs) == set(forgotten) | set(idle), tombs  # the TTL's tombstones: the idle users only
    # The changelog: the idle users deleted, the forgotten ones fresh, the others whole.
    cl = TopicReader(kafka_bootstrap, f"{group}-user-state-changelog")
    while cl.poll(1.0):
        pass
    cl.close()
    final = {k.decode(): v for k, v in _last_per_key(cl.messages).items() if k is not None}
    assert all(final[u] is None for u in idle)
    seqs = {u: UserState.unpack(final[u], bundle.layers, bundle.hidden).seq for u in forgotten + active}
    assert seqs == {**{u: 12 for u in forgotten}, **{u: 16 for u in active}}
    # The latest-vector topic, last value per key, is each user's last on the vector topic.
    lt = TopicReader(kafka_bootstrap, latest)
    while lt.poll(1.0):
        pass
    lt.close()
    want = {k: _vec(v) for k, v in _last_per_key(reader.messages).items()}
    assert {k: _vec(v) for k, v in _last_per_key(lt.messages).items()} == want
    assert _compacted(kafka_bootstrap, latest)
    # The consumers, fed the vector topic as it is: the forgotten users were dropped at
    # their tombstone (their new seq 1 is no replay), the idle ones are gone.
    alerts = AlertHandler(AlertConfig())
    recs = RecommendHandler(ItemIndex(bundle), 5)
    items = [Tombstone(k.decode()) if v is None else VectorMessage.from_bytes(v) for k, v in reader.messages]
    VectorTopicLoop(LoopConfig(out, "alerts", "g"), alerts).dispatch(items)
    published = VectorTopicLoop(LoopConfig(out, "recs", "g"), recs).dispatch(items)
    assert alerts.scorer.replays == 0
    assert {u: alerts.scorer.users[u].n for u in forgotten} == {u: 12 for u in forgotten}
    assert not set(idle) & set(alerts.scorer.users)
    assert {k.decode() for k, v in published if v is None} == set(forgotten) | set(idle)


def _progress(messages, forgotten, active, idle) -> bool:
    """Phase 2 is all out: the idle users' tombstones, the forgotten users' new vectors,
    the active users' vectors of both phases."""
    before, after, tombs = _split_at_tombstones(messages)
    if not set(idle) <= set(tombs) or VectorLog.of(after).distinct() < 12 * len(forgotten):
        return False
    by_user = VectorLog.of(before).by_user
    return all(len(by_user.get(u, {})) >= 16 for u in active)


def _compacted(bootstrap: str, topic: str) -> bool:
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient({"bootstrap.servers": bootstrap})
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    cfg = admin.describe_configs([res])[res].result(30)
    return cfg["cleanup.policy"].value == "compact"


def test_bad_settings_end_in_one_line(capsys, tmp_path):
    from clickvec.stream.worker import cli

    assert cli.main(["--state-ttl", "a week", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clickvec stream: duration 'a week'") and "\n" not in err
    assert cli.main(["--latest-topic", "user-vectors", "--model", str(tmp_path)]) == 2
    assert "latest_topic must be a topic of its own" in capsys.readouterr().err
    assert forget_cmd.main(["--brokers", "127.0.0.1:1"]) == 2
    assert capsys.readouterr().err.strip() == "clickvec forget: no user ids given (as arguments or with --file)"
