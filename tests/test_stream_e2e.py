"""End to end on the real broker: the Faust worker in its own process(es).

Every test checks the design's property: the vector published after a user's n-th
event equals the offline encoder on that user's first n events (max abs diff <= 1e-5).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import numpy as np
import pytest
from stream_util import (
    TopicReader,
    VectorLog,
    WorkerProcess,
    check_vectors,
    read_dead_letters,
    wait_for,
)

from clickvec.bundle.reader import load_bundle
from clickvec.contract.events import ClickEvent
from clickvec.devtools.produce import produce_events, produce_records
from clickvec.devtools.synth import SynthConfig, generate_events
from clickvec.stream.worker.state import UserState

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture(scope="module")
def bundle(stream_bundle_path):
    return load_bundle(stream_bundle_path, providers="cpu")


def _events(n_users: int, n_events: int, seed: int) -> list[ClickEvent]:
    evs = generate_events(SynthConfig(n_users=n_users, seed=seed, mean_events=n_events / n_users * 1.3))
    assert len(evs) >= n_events, f"synthetic set too small: {len(evs)} < {n_events}"
    return evs[:n_events]


def _events_every_user(n_users: int, n_events: int, seed: int) -> list[ClickEvent]:
    """Exactly `n_events` events in time order in which all `n_users` users appear: each
    user's history cut to a common cap (its first events), the surplus taken off the
    longest histories."""
    evs = generate_events(SynthConfig(n_users=n_users, seed=seed, mean_events=n_events / n_users * 1.3))
    by_user: dict[str, list[ClickEvent]] = {}
    for e in evs:
        by_user.setdefault(e.user_id, []).append(e)
    assert len(by_user) == n_users and len(evs) >= n_events
    cap = max(len(v) for v in by_user.values())
    while sum(min(len(v), cap - 1) for v in by_user.values()) >= n_events:
        cap -= 1
    keep = {u: min(len(v), cap) for u, v in by_user.items()}
    surplus = sum(keep.values()) - n_events
    for u in sorted(keep, key=lambda u: -keep[u])[:surplus]:
        keep[u] -= 1
    out = [e for u, v in by_user.items() for e in v[:keep[u]]]
    out.sort(key=lambda e: e.ts)
    return out


def _progress(log_messages) -> int:
    return VectorLog.of(log_messages).distinct()


def _final_states(bootstrap: str, group: str, bundle, events) -> dict[str, int]:
    """Last changelog value per user: seq equals the events sent and (h, c) equal the
    offline encoder's final state."""
    reader = TopicReader(bootstrap, f"{group}-user-state-changelog")
    users = {e.user_id for e in events}
    seen: dict[str, bytes] = {}
    for _ in range(60):
        got = reader.poll(1.0)
        seen = {k.decode(): v for k, v in reader.messages if k is not None}
        if users <= set(seen) and got == 0:  # everyone seen and the topic read to its end
            break
    reader.close()
    assert users <= set(seen), f"{len(users - set(seen))} users have no state in the changelog"
    by_user: dict[str, list[ClickEvent]] = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    worst = 0.0
    for uid, evs in by_user.items():
        st = UserState.unpack(seen[uid], bundle.layers, bundle.hidden)
        assert st.seq == len(evs), f"user {uid}: state applied {st.seq} events, {len(evs)} were sent"
        enc = bundle.spec.encode_sequence([e.item_id for e in evs], [e.event_type for e in evs],
                                          [e.ts for e in evs])
        h0, c0 = bundle.zero_state(1)
        h, c, *_ = bundle.step(enc[:, 0:1], enc[:, 1:2], enc[:, 2:3], np.array([len(evs)], np.int32), h0, c0)
        worst = max(worst, float(np.abs(st.h - h[:, 0]).max()), float(np.abs(st.c - c[:, 0]).max()))
    assert worst <= 1e-5, f"final state differs from offline by {worst}"
    return {"users": len(by_user), "state_max_abs_diff": worst}


def _topics(new_topic):
    return new_topic(4, "clicks"), new_topic(4, "vectors"), new_topic(4, "dlq")


def test_parity_end_to_end(kafka_bootstrap, new_topic, new_group, stream_bundle_path, bundle, tmp_path):
    events = _events_every_user(2000, 20_000, seed=11)
    assert len(events) == 20_000 and len({e.user_id for e in events}) == 2000
    src, out, dlq = _topics(new_topic)
    assert produce_events(events, kafka_bootstrap, src) == len(events)
    group = new_group()
    # Batches computed ahead of storage (--pipeline-depth 2); the other tests use the default.
    w = WorkerProcess(kafka_bootstrap, stream_bundle_path, src, out, dlq, group, tmp_path / "s",
                      tmp_path / "w.log", "--pipeline-depth", "2").start()
    reader = TopicReader(kafka_bootstrap, out)
    try:
        wait_for(reader, lambda m: _progress(m) >= len(events), 180, [w])
        reader.poll(1.0)
    finally:
        assert w.stop() == 0, w.log_tail()
        reader.close()
    stats = check_vectors(bundle, events, VectorLog.of(reader.messages))
    assert stats["distinct"] == len(events)
    print("parity end to end:", stats)


def test_crash_twice_nothing_lost_nothing_twice(kafka_bootstrap, new_topic, new_group, stream_bundle_path,
                                                bundle, tmp_path):
    events = _events(1000, 12_000, seed=12)
    src, out, dlq = _topics(new_topic)
    group = new_group()
    producer = threading.Thread(target=produce_events, args=(events, kafka_bootstrap, src),
                                kwargs={"rate": 1200.0}, daemon=True)
    producer.start()
    w = WorkerProcess(kafka_bootstrap, stream_bundle_path, src, out, dlq, group, tmp_path / "s",
                      tmp_path / "w.log").start()
    reader = TopicReader(kafka_bootstrap, out)
    kills = 0
    try:
        for fraction in (0.2, 0.5):
            wait_for(reader, lambda m, f=fraction: _progress(m) >= f * len(events), 120, [w])
            w.kill()
            kills += 1
            w.start()  # same state dir: RocksDB as the killed process left it
        producer.join(60)
        wait_for(reader, lambda m: _progress(m) >= len(events), 180, [w])
        reader.poll(1.0)
    finally:
        w.stop()
        reader.close()
    assert kills == 2
    log = VectorLog.of(reader.messages)
    stats = check_vectors(bundle, events, log)
    stats.update(_final_states(kafka_bootstrap, group, bundle, events))
    stats["duplicates_published"] = log.total - log.distinct()
    print("crash x2:", stats)


def _applied(port_url: str) -> float:
    body = urllib.request.urlopen(port_url, timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith("clickvec_events_applied_total"):
            return float(line.split()[-1])
    return 0.0


def _readiness(w: WorkerProcess) -> dict:
    port = w.cmd[w.cmd.index("--web-port") + 1]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # 503 while starting or rebalancing
        return json.loads(e.read())
    except OSError:
        return {}


def _wait_shared(a: WorkerProcess, b: WorkerProcess, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ra, rb = _readiness(a), _readiness(b)
        if ra.get("ready") and rb.get("ready") and ra.get("partitions") and rb.get("partitions"):
            return
        assert a.alive() and b.alive(), a.log_tail() + b.log_tail()
        time.sleep(0.5)
    raise AssertionError(f"the partitions were not shared by both workers within {timeout}s: {ra} {rb}")


def test_two_workers_one_leaves(kafka_bootstrap, new_topic, new_group, stream_bundle_path, bundle, tmp_path):
    events = _events(1000, 12_000, seed=13)
    src, out, dlq = _topics(new_topic)
    group = new_group()
    a = WorkerProcess(kafka_bootstrap, stream_bundle_path, src, out, dlq, group, tmp_path / "a",
                      tmp_path / "a.log").start()
    b = WorkerProcess(kafka_bootstrap, stream_bundle_path, src, out, dlq, group, tmp_path / "b",
                      tmp_path / "b.log").start()
    producer = threading.Thread(target=produce_events, args=(events, kafka_bootstrap, src),
                                kwargs={"rate": 1000.0}, daemon=True)
    reader = TopicReader(kafka_bootstrap, out)
    b_port = b.cmd[b.cmd.index("--web-port") + 1]
    try:
        _wait_shared(a, b)  # both in the group, the partitions split between them
        producer.start()
        wait_for(reader, lambda m: _progress(m) >= 0.4 * len(events), 150, [a, b])
        b_applied = _applied(f"http://127.0.0.1:{b_port}/metrics")
        assert b.stop() == 0, b.log_tail()  # leaves the group mid-stream
        producer.join(60)
        wait_for(reader, lambda m: _progress(m) >= len(events), 180, [a])
        reader.poll(1.0)
    finally:
        a.stop()
        b.stop()
        reader.close()
    assert b_applied > 0, "the second worker never got a partition"
    stats = check_vectors(bundle, events, VectorLog.of(reader.messages))
    stats.update(_final_states(kafka_bootstrap, group, bundle, events))
    stats["applied_by_b_before_leaving"] = b_applied
    stats["holes_filled"] = sum(w.log_path.read_text(errors="replace").count("were not delivered by the consumer")
                                for w in (a, b))
    print("two workers:", stats)


BAD = [
    (b"u-bad-1", b"", "empty_message"),
    (b"u-bad-2", b"\xff\xfe\x00garbage", "bad_encoding"),
    (b"u-bad-3", b"{not json", "not_json"),
    (b"u-bad-4", b"[1, 2, 3]", "not_an_object"),
    (b"u-bad-5", b'{"user_id": "u-bad-5", "item_id": "i1", "ts": 1767225600000}', "missing_field"),
    (b"u-bad-6", b'{"user_id": "u-bad-6", "item_id": "i1", "event_type": "view", "ts": "yesterday"}',
     "wrong_type"),
    (b"u-bad-7", b'{"user_id": "", "item_id": "i1", "event_type": "view", "ts": 1767225600000}', "empty_id"),
    (b"u-bad-8", b'{"user_id": "u-bad-8", "item_id": "i1", "event_type": "view", "ts": 12}',
     "ts_out_of_range"),
    (b"u-bad-9", b'{"user_id": "u-bad-9", "item_id": "i1", "event_type": "view", "ts": 1767225600000, '
                 b'"amount": NaN}', "non_finite_number"),
    (b"someone-else", b'{"user_id": "u-bad-10", "item_id": "i1", "event_type": "view", "ts": 1767225600000}',
     "key_mismatch"),
    (b"u-bad-11", b"x" * 70_000, "oversized_message"),
]


def test_bad_input_dead_lettered_valid_applied(kafka_bootstrap, new_topic, new_group, stream_bundle_path,
                                              bundle, tmp_path):
    events = _events(300, 3_000, seed=14)
    src, out, dlq = _topics(new_topic)
    records: list[tuple[bytes | None, bytes]] = []
    bad_iter = iter(BAD * 3)
    for i, e in enumerate(events):
        records.append((e.user_id.encode(), e.to_bytes()))
        if i % 90 == 45:
            bad = next(bad_iter, None)
            if bad is not None:
                records.append((bad[0], bad[1]))
    n_bad = len(records) - len(events)
    assert n_bad == len(BAD) * 3
    assert produce_records(records, kafka_bootstrap, src) == len(records)
    group = new_group()
    w = WorkerProcess(kafka_bootstrap, stream_bundle_path, src, out, dlq, group, tmp_path / "s",
                      tmp_path / "w.log").start()
    reader = TopicReader(kafka_bootstrap, out)
    dead_reader = TopicReader(kafka_bootstrap, dlq)
    try:
        wait_for(reader, lambda m: _progress(m) >= len(events), 150, [w])
        wait_for(dead_reader, lambda m: len(m) >= n_bad, 60, [w])
        assert w.alive(), "the worker stopped on bad input"
    finally:
        w.stop()
        reader.close()
        dead_reader.close()
    check_vectors(bundle, events, VectorLog.of(reader.messages))
    dead = read_dead_letters(dead_reader.messages)
    assert len(dead) == n_bad
    reasons = Counter(d.reason for d in dead)
    assert reasons == Counter(r for _, _, r in BAD * 3), reasons
    expected = {(k, v): r for k, v, r in BAD}
    for d in dead:
        assert d.topic == src and d.offset >= 0 and 0 <= d.partition < 4
        assert expected[(d.key, d.value or b"")] == d.reason  # original bytes kept
        assert d.detail
    # The dead letter's source offset points at the original message.
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": new_group()})
    d = dead[0]
    c.assign([TopicPartition(src, d.partition, d.offset)])
    m = c.consume(1, timeout=10)[0]
    c.close()
    assert (m.key(), m.value() or b"") == (d.key, d.value or b"")
    print("dead letters by reason:", json.dumps(dict(reasons)))


def test_undeliverable_output_stops_the_worker_and_loses_nothing(kafka_bootstrap, new_topic, new_group,
                                                                stream_bundle_path, bundle, tmp_path):
    """The output topic refuses the vectors (max.message.bytes too small): the worker
    stops with an error instead of going on, stores no state and commits nothing; once
    the topic is fixed, a restart publishes every vector exactly."""
    from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

    events = _events(100, 1_000, seed=14)
    src, out, dlq = _topics(new_topic)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})

    def set_max_bytes(n: int) -> None:
        res = ConfigResource(ConfigResource.Type.TOPIC, out, incremental_configs=[
            ConfigEntry("max.message.bytes", str(n), incremental_operation=AlterConfigOpType.SET)])
        for f in admin.incremental_alter_configs([res]).values():
            f.result(30)

    set_max_bytes(200)
    assert produce_events(events, kafka_bootstrap, src) == len(events)
    group = new_group()
    w = WorkerProcess(kafka_bootstrap, stream_bundle_path, src, out, dlq, group, tmp_path / "s",
                      tmp_path / "w.log")
    w.start()
    assert w.proc is not None
    rc = w.proc.wait(120)
    assert rc != 0, "the worker kept running although its outputs were refused"
    assert "DeliveryError" in w.log_path.read_text(errors="replace")
    set_max_bytes(1_048_588)
    reader = TopicReader(kafka_bootstrap, out)
    try:
        w.start()  # same state directory
        wait_for(reader, lambda m: _progress(m) >= len(events), 120, [w])
        reader.poll(1.0)
    finally:
        assert w.stop() == 0, w.log_tail()
        reader.close()
    log = VectorLog.of(reader.messages)
    stats = check_vectors(bundle, events, log)
    stats.update(_final_states(kafka_bootstrap, group, bundle, events))
    print("undeliverable output:", stats)
