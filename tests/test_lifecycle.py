"""Model lifecycle end to end on the real broker: backfill then the live worker, the
latest vector served from Redis, and a rollout to a second model without a gap.

The property: a user's vector after their n-th event equals the offline encoder on their
first n events, whichever of backfill, worker or rollout produced it; nothing is skipped
and nothing applied twice (seqs are contiguous and never exceed the events sent).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict

import numpy as np
import pytest
from kafka_util import consume_all
from stream_util import REPO, TopicReader, WorkerProcess, wait_for

from clickvec.bundle.reader import load_bundle
from clickvec.contract.events import parse_event
from clickvec.contract.messages import VectorMessage
from clickvec.devtools.produce import produce_events
from clickvec.devtools.synth import SynthConfig, generate_events
from clickvec.lifecycle.groupstate import changelog_topic
from clickvec.lifecycle.history import key_partition

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def clickvec(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clickvec.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def offline(bundle, events) -> np.ndarray:
    """The offline encoder's vectors after each of one user's events: (n, D)."""
    enc = bundle.spec.encode_sequence([e.item_id for e in events], [e.event_type for e in events],
                                      [e.ts for e in events])
    return bundle.encode_offline(enc)


def input_history(bootstrap: str, topic: str, n: int):
    """Every event of the input topic with its (partition, offset), per user in order."""
    msgs = consume_all(bootstrap, topic, n)
    assert len(msgs) == n
    per_user = defaultdict(list)
    for m in sorted(msgs, key=lambda m: (m.partition(), m.offset())):
        ev = parse_event(m.value())
        per_user[ev.user_id].append((ev, m.partition(), m.offset()))
    return per_user


def test_backfill_then_stream_then_serve(kafka_bootstrap, new_topic, new_group, stream_bundle_path, redis_url,
                                        tmp_path):
    """Backfill the first half of each partition, then the worker streams the rest: the
    backfill publishes one vector per user (its latest), the worker continues with the
    next seq, every vector equals the offline encoder on all the user's events so far.
    Then serve-redis keeps the latest of them in Redis, where RedisLookup finds them."""
    bundle = load_bundle(stream_bundle_path, providers="cpu")
    events = generate_events(SynthConfig(n_users=400, seed=21, mean_events=10))[:4000]
    src, out, dlq = new_topic(4, "clicks"), new_topic(4, "vectors"), new_topic(4, "dlq")
    assert produce_events(events, kafka_bootstrap, src) == len(events)
    history = input_history(kafka_bootstrap, src, len(events))
    # `--file` places users as the producer does: clickvec produce's partitioner, here checked.
    assert all(key_partition(u.encode(), 4) == evs[0][1] for u, evs in history.items())
    ends: dict[int, int] = defaultdict(int)
    for evs in history.values():
        for _, p, o in evs:
            ends[p] = max(ends[p], o + 1)
    until = {p: e // 2 for p, e in ends.items()}
    group = new_group()
    common = ["--model", str(stream_bundle_path), "--brokers", kafka_bootstrap, "--in", src, "--out", out,
              "--dlq", dlq, "--group", group, "--providers", "cpu"]
    r = clickvec("backfill", *common, "--until", ",".join(f"{p}:{o}" for p, o in until.items()))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    before = {u: sum(1 for _, p, o in evs if o < until[p]) for u, evs in history.items()}
    assert report["events"] == sum(before.values()) and report["skipped"] == 0
    assert report["users"] == report["vectors"] == sum(1 for n in before.values() if n)
    assert {int(p): o for p, o in report["offsets"].items()} == until
    assert report["changelog"] == changelog_topic(group)

    again = clickvec("backfill", *common)  # the group now has offsets and a changelog
    assert again.returncode == 2 and "already has committed offsets" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1, again.stderr

    w = WorkerProcess(kafka_bootstrap, stream_bundle_path, src, out, dlq, group, tmp_path / "s",
                      tmp_path / "w.log").start()
    reader = TopicReader(kafka_bootstrap, out)
    expected = report["vectors"] + len(events) - report["events"]
    try:
        wait_for(reader, lambda m: len(m) >= expected, 120, [w])
        reader.poll(1.0)
    finally:
        assert w.stop() == 0, w.log_tail()
        reader.close()

    got: dict[str, list[VectorMessage]] = defaultdict(list)
    for _, v in reader.messages:
        m = VectorMessage.from_bytes(v)
        got[m.user_id].append(m)
    worst = 0.0
    for uid, evs in history.items():
        z = offline(bundle, [e for e, _, _ in evs])
        msgs = got[uid]
        seqs = [m.seq for m in msgs]
        n0 = before[uid]
        # Backfill: one vector at seq n0 (none for a user without backfilled events);
        # the worker: every later seq once, in order, none at or below n0.
        want = ([n0] if n0 else []) + list(range(n0 + 1, len(evs) + 1))
        assert seqs == want, f"user {uid}: seqs {seqs}, expected {want}"
        for m in msgs:
            worst = max(worst, float(np.abs(np.asarray(m.vector, np.float32) - z[m.seq - 1]).max()))
    assert worst <= 1e-5, f"vectors differ from the offline encoder by {worst}"
    assert set(got) == set(history)
    print("backfill then stream:", {"users": len(history), "backfilled_events": report["events"],
                                    "max_abs_diff": worst, "backfill_s": report["seconds"]})
    serve_and_look_up(kafka_bootstrap, redis_url, out, got, new_group(), tmp_path)


def serve_and_look_up(bootstrap: str, redis_url: str, topic: str, got: dict[str, list[VectorMessage]],
                      group: str, tmp_path) -> None:
    """`clickvec serve-redis` over the vector topic, plus a tombstone and a stale
    duplicate: RedisLookup and TopicLookup give each user's last vector on the topic."""
    import redis

    from clickvec.client import RedisLookup, TopicLookup
    from clickvec.devtools.produce import produce_records

    # The package re-exports the lookups without importing redis-py (the `serve` extra) itself.
    lazy = "import sys, clickvec.client as c; assert 'redis' not in sys.modules; c.TopicLookup; print(c.__all__)"
    assert "RedisLookup" in subprocess.run([sys.executable, "-c", lazy], capture_output=True, text=True,
                                           check=True).stdout

    users = sorted(got)
    gone, dup = users[0], users[1]
    stale = got[dup][0]  # an older vector of `dup` sent again: must not replace the latest
    assert produce_records([(gone.encode(), None), (dup.encode(), stale.to_bytes())], bootstrap, topic,
                           extra_config={"partitioner": "murmur2_random"}) == 2  # as the worker sends
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    r = clickvec("serve-redis", "--brokers", bootstrap, "--in", topic, "--group", group, "--redis", redis_url,
                 "--prefix", prefix, "--idle-exit", "2", "--summary", str(tmp_path / "serve.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads((tmp_path / "serve.json").read_text())["redis"]
    assert stats["deleted"] == 1 and stats["stale"] >= 1, stats
    lookup = RedisLookup(redis_url, prefix=prefix)
    topic_lookup = TopicLookup(bootstrap, topic)
    try:
        for uid in users:
            want = None if uid == gone else max(got[uid], key=lambda m: m.seq)
            for found in (lookup.get(uid), topic_lookup.get(uid)):
                if want is None:
                    assert found is None, uid
                    continue
                assert found is not None and (found.model_id, found.seq, found.event_ts) == (
                    want.model_id, want.seq, want.event_ts), (uid, found, want)
                assert np.array_equal(found.vector, np.asarray(want.vector, np.float32)), uid
        assert lookup.get_many([dup, gone])[1] is None
    finally:
        topic_lookup.close()
        redis.Redis.from_url(redis_url).close()


def test_rollout_without_a_gap(kafka_bootstrap, new_topic, new_group, stream_bundle_path, second_bundle_path,
                               tmp_path, caplog):
    """The old model's worker serves; events keep coming; `clickvec rollout` rebuilds
    every user under the new model, writes the cut-over and the new group's state; the
    new model's worker takes over. Followed as cutover.py documents, no user's seqs have
    a gap, and every new-model vector equals the new model's offline encoder on the
    user's whole history up to it (old-model vectors: the old model's)."""
    old_b = load_bundle(stream_bundle_path, providers="cpu")
    new_b = load_bundle(second_bundle_path, providers="cpu")
    events = generate_events(SynthConfig(n_users=300, seed=31, mean_events=10))[:3000]
    first, later = events[:1500], events[1500:]
    src, out, dlq = new_topic(4, "clicks"), new_topic(4, "vectors"), new_topic(4, "dlq")
    assert produce_events(first, kafka_bootstrap, src) == len(first)
    old_group, new_group_name = new_group(), f"{new_group()}-{{model}}"
    old = WorkerProcess(kafka_bootstrap, stream_bundle_path, src, out, dlq, old_group, tmp_path / "old",
                        tmp_path / "old.log").start()
    producer = threading.Thread(target=produce_events, args=(later, kafka_bootstrap, src),
                                kwargs={"rate": 250.0}, daemon=True)
    producer.start()
    roll = subprocess.Popen(
        [sys.executable, "-m", "clickvec.cli", "rollout", "--from-model", str(stream_bundle_path),
         "--to-model", str(second_bundle_path), "--from-group", old_group, "--group", new_group_name,
         "--brokers", kafka_bootstrap, "--in", src, "--out", out, "--dlq", dlq, "--providers", "cpu",
         "--catch-up-events", "300", "--lag-timeout", "90"],
        stdout=subprocess.PIPE, stderr=open(tmp_path / "rollout.log", "w"), text=True, cwd=REPO)
    new = None
    phases = []
    try:
        for line in roll.stdout:
            phases.append(json.loads(line))
            if phases[-1]["phase"] == "start_new":
                assert phases[-1]["group"] == new_group_name.replace("{model}", new_b.model_id[:12])
                # The worker resolves "{model}" in --group the same way (stream/worker/config.py).
                new = WorkerProcess(kafka_bootstrap, second_bundle_path, src, out, dlq, new_group_name,
                                    tmp_path / "new", tmp_path / "new.log").start()
        assert roll.wait(60) == 0, (tmp_path / "rollout.log").read_text()[-3000:]
        assert new is not None and phases[-1]["phase"] == "done", phases
        producer.join(60)
        per_user = {u: len([e for e in events if e.user_id == u]) for u in {e.user_id for e in events}}
        reader = TopicReader(kafka_bootstrap, out)
        try:
            def done(msgs) -> bool:
                last = {}
                for k, v in msgs:
                    if k != b"__clickvec_control__":
                        m = VectorMessage.from_bytes(v)
                        if m.model_id == new_b.model_id:
                            last[m.user_id] = max(last.get(m.user_id, 0), m.seq)
                return all(last.get(u, 0) == n for u, n in per_user.items())

            wait_for(reader, done, 120, [old, new])
        finally:
            reader.close()
    finally:
        for w in (old, new):
            if w is not None:
                w.stop()
        if roll.poll() is None:
            roll.kill()
    assert any(p["phase"] == "rebuild" and p["users_rebuilt"] > 0 for p in phases)
    print("rollout phases:", [(p["phase"], p.get("events", p.get("lag", ""))) for p in phases])
    msgs = check_cutover(kafka_bootstrap, out, old_b, new_b, events)
    recommend_across(msgs, old_b, new_b, events, caplog)
    follow_after_restart(kafka_bootstrap, out, new_topic(4, "recs"), new_group(), old_b, new_b, msgs)


def check_cutover(bootstrap: str, topic: str, old_b, new_b, events) -> list:
    from confluent_kafka import Consumer, TopicPartition

    from clickvec.lifecycle.cutover import Cutover, ModelFollower, is_control

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"chk-{uuid.uuid4().hex}"})
    parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
    total = sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts)
    c.close()
    msgs = sorted(consume_all(bootstrap, topic, total), key=lambda m: (m.partition(), m.offset()))
    assert len(msgs) == total
    by_user = defaultdict(list)
    for e in events:
        by_user[e.user_id].append(e)
    z = {(b.model_id, u): offline(b, evs) for b in (old_b, new_b) for u, evs in by_user.items()}
    follower, taken = ModelFollower(), defaultdict(list)
    controls, worst = defaultdict(int), 0.0
    for m in msgs:
        if is_control(m.key()):
            cut = Cutover.from_bytes(m.value())
            assert (cut.model_id, cut.from_model_id) == (new_b.model_id, old_b.model_id)
            follower.control(m.partition(), cut)
            controls[m.partition()] += 1
            continue
        v = VectorMessage.from_bytes(m.value())
        assert v.model_id in (old_b.model_id, new_b.model_id)
        assert key_partition(m.key(), len(parts), "murmur2_random") == m.partition()  # the worker's sink
        assert 1 <= v.seq <= len(by_user[v.user_id]), (v.user_id, v.seq)
        ref = z[(v.model_id, v.user_id)][v.seq - 1]
        worst = max(worst, float(np.abs(np.asarray(v.vector, np.float32) - ref).max()))
        if follower.accept(m.partition(), v):
            taken[v.user_id].append((controls[m.partition()] > 0, v.model_id, v.seq))
    assert worst <= 1e-5, f"a vector differs from its model's offline encoder by {worst}"
    assert all(n == 1 for n in controls.values()) and len(controls) == len(parts), controls
    for uid, evs in by_user.items():
        seqs = {s for _, _, s in taken[uid]}
        assert seqs == set(range(1, len(evs) + 1)), f"user {uid}: gap, took {sorted(seqs)} of {len(evs)}"
        assert all(model == new_b.model_id for after, model, _ in taken[uid] if after), uid
        assert taken[uid][-1][1:] == (new_b.model_id, len(evs)), taken[uid][-3:]
    print("rollout:", {"users": len(by_user), "vectors": total, "max_abs_diff": worst})
    return msgs


def recommend_across(msgs, old_b, new_b, events, caplog) -> None:
    """The rollout's vector topic, as consumed, through the consumer loop's decoding and
    `clickvec recommend`'s handler given both bundles: after each partition's control
    record only new-model vectors are scored, each with its own model's bundle; the last
    recommendation of every user is the new model's on the user's whole history. Given
    only the old bundle, the cut-over is one warning line and the new vectors are skipped."""
    import logging

    from clickvec.lifecycle.cutover import Cutover, ModelFollower, is_control
    from clickvec.stream.consumers.loop import LoopConfig, VectorTopicLoop
    from clickvec.stream.consumers.recommend import ItemIndex, RecommendHandler

    both = RecommendHandler([ItemIndex(old_b), ItemIndex(new_b)], k=5)
    loop = VectorTopicLoop(LoopConfig("in", "out", "g"), both)
    out, _ = loop.handle(msgs)
    recs = [json.loads(v) for _, v in out]
    follower, decoded = ModelFollower(), []  # what the loop should hand on, as cutover.py says
    for m in msgs:
        if is_control(m.key()):
            follower.control(m.partition(), Cutover.from_bytes(m.value()))
        elif follower.takes_model(m.partition(), (v := VectorMessage.from_bytes(m.value())).model_id):
            decoded.append(v)
    assert sorted((r["user_id"], r["seq"], r["model_id"]) for r in recs) == sorted(
        (m.user_id, m.seq, m.model_id) for m in decoded)
    parts = {m.partition() for m in msgs}
    assert loop.stats.controls == len(parts) and loop.stats.undecodable == 0, loop.stats
    assert loop.stats.decoded + loop.stats.other_model + loop.stats.controls == len(msgs) == loop.stats.consumed
    assert both.skipped_model == 0 and both.recommended == len(recs) == len(decoded)
    n_events = defaultdict(int)
    for e in events:
        n_events[e.user_id] += 1
    last = {r["user_id"]: r for r in recs}
    assert {r["model_id"] for r in last.values()} == {new_b.model_id}
    assert all(r["seq"] == n_events[u] for u, r in last.items()) and set(last) == set(n_events)
    vecs = {(m.user_id, m.seq): m for m in decoded if m.model_id == new_b.model_id}
    ix = both.indexes[new_b.model_id]
    for u, r in list(last.items())[:50]:  # the new bundle's own top-k of that vector
        row, _ = ix.topk(np.asarray([vecs[(u, r["seq"])].vector], np.float32), 5)
        assert r["items"] == [new_b.spec.index_to_item(int(i)) for i in row[0]], u

    old_only = RecommendHandler(ItemIndex(old_b), k=5)
    loop = VectorTopicLoop(LoopConfig("in", "out", "g"), old_only)
    with caplog.at_level(logging.WARNING, logger="clickvec.stream.consumers.recommend"):
        loop.handle(msgs)
    warned = [r for r in caplog.records if "no --model bundle" in r.getMessage()]
    assert len(warned) == 1 and new_b.model_id[:12] in warned[0].getMessage(), caplog.text
    assert old_only.skipped_model == sum(1 for m in decoded if m.model_id == new_b.model_id)
    # The alert scorer never measures a vector's movement against another model's vector.
    from clickvec.stream.consumers.alerts import AlertScorer

    scorer, prev = AlertScorer(), {}
    for m in decoded:
        sc = scorer.score(m)
        v = np.asarray(m.vector, np.float32)
        ref = prev.get(m.user_id)
        if not sc.replay:
            want = 0.0 if ref is None or ref[0] != m.model_id else 1 - float(ref[1] @ v) / float(
                np.linalg.norm(ref[1]) * np.linalg.norm(v))
            assert sc.movement == pytest.approx(want, abs=1e-5), (m.user_id, m.seq, m.model_id)
        if not sc.replay or (ref[0] != m.model_id and ref[2] == m.seq):  # a cut-over's restatement
            prev[m.user_id] = (m.model_id, v, m.seq if not sc.replay else ref[2])
    print("recommend across the cut-over:", {"recommendations": len(recs), "other_model": loop.stats.other_model})


def follow_after_restart(bootstrap: str, topic: str, recs: str, group: str, old_b, new_b, msgs) -> None:
    """The real consumer loop commits each partition's active model with its offsets: a
    consumer of the same group started after the control records were read still skips
    a late vector of the old model (an old worker not yet stopped)."""
    from clickvec.devtools.produce import produce_records
    from clickvec.kafka import KafkaConnection
    from clickvec.stream.consumers.loop import LoopConfig, VectorTopicLoop
    from clickvec.stream.consumers.recommend import ItemIndex, RecommendHandler

    def run_loop() -> tuple:
        handler = RecommendHandler([ItemIndex(old_b), ItemIndex(new_b)], k=5)
        loop = VectorTopicLoop(LoopConfig(topic, recs, group, idle_exit_s=3.0,
                                          connection=KafkaConnection(brokers=bootstrap)), handler)
        t = threading.Thread(target=loop.run)  # not the main thread: no signal handlers
        t.start()
        t.join(60)
        return loop.stats, handler

    t0 = time.monotonic()
    first, _ = run_loop()
    assert first.consumed == len(msgs) and first.controls == 4 and first.stopped_by == "idle", first
    late = next(VectorMessage.from_bytes(m.value()) for m in msgs if not m.key().startswith(b"__clickvec")
                and VectorMessage.from_bytes(m.value()).model_id == old_b.model_id)
    assert produce_records([(late.user_id.encode(), late.to_bytes())], bootstrap, topic,
                           extra_config={"partitioner": "murmur2_random"}) == 1
    second, handler = run_loop()
    assert (second.consumed, second.controls, second.other_model, handler.recommended) == (1, 0, 1, 0), second
    print("follow after restart:", {"seconds": round(time.monotonic() - t0, 1)})


def test_backfill_from_file(kafka_bootstrap, new_topic, new_group, stream_bundle_path, tmp_path):
    """`--file`: history that is not in the topic. Each user's state lands in the
    changelog partition its key goes to in the input topic, with seq = its events and
    (h, c) the offline encoder's; one vector per user; no offsets committed (the worker
    then reads the whole topic, whose events all come after the file's)."""
    from clickvec.eventfile import write_events
    from clickvec.lifecycle.backfill import backfill
    from clickvec.stream.worker.config import StreamConfig
    from clickvec.stream.worker.state import UserState

    bundle = load_bundle(stream_bundle_path, providers="cpu")
    events = generate_events(SynthConfig(n_users=150, seed=22, mean_events=8))[:1000]
    path = write_events(events, tmp_path / "history.parquet")
    src, out = new_topic(4, "clicks"), new_topic(4, "vectors")
    cfg = StreamConfig(model=str(stream_bundle_path), brokers=kafka_bootstrap, in_topic=src, out_topic=out,
                       group=new_group(), providers="cpu")
    rep = backfill(cfg, bundle, file=str(path))
    by_user = defaultdict(list)
    for e in events:
        by_user[e.user_id].append(e)
    assert (rep.users, rep.events, rep.vectors, rep.offsets) == (len(by_user), len(events), len(by_user), {})
    states = consume_all(kafka_bootstrap, changelog_topic(cfg.group), len(by_user))
    vectors = consume_all(kafka_bootstrap, out, len(by_user))
    assert len(states) == len(vectors) == len(by_user)
    worst = 0.0
    for m in states:
        evs = by_user[m.key().decode()]
        st = UserState.unpack(m.value(), bundle.layers, bundle.hidden)
        assert m.partition() == key_partition(m.key(), 4) == st.partition
        assert (st.seq, st.offset, st.last_ts) == (len(evs), -1, evs[-1].ts)
        enc = bundle.spec.encode_sequence([e.item_id for e in evs], [e.event_type for e in evs], [e.ts for e in evs])
        h0, c0 = bundle.zero_state(1)
        h, c, *_ = bundle.step(enc[:, 0:1], enc[:, 1:2], enc[:, 2:3], np.array([len(evs)], np.int32), h0, c0)
        worst = max(worst, float(np.abs(st.h - h[:, 0]).max()), float(np.abs(st.c - c[:, 0]).max()))
    for m in vectors:
        v = VectorMessage.from_bytes(m.value())
        evs = by_user[v.user_id]
        assert v.seq == len(evs) and v.event_ts == evs[-1].ts
        worst = max(worst, float(np.abs(np.asarray(v.vector, np.float32) - offline(bundle, evs)[-1]).max()))
    assert worst <= 1e-5, worst


def test_redis_fetch_updates_empty_package_lists(tmp_path, monkeypatch):
    """A fresh Debian image has no apt package lists: `apt-get download` fails with
    "Unable to locate package". As root, clickvec.devtools.redis runs `apt-get update`
    and downloads again; otherwise it says what to do in one line. (A stand-in apt-get
    on PATH: this checks `_fetch`'s decision, not the Debian mirror.)"""
    import os

    from clickvec.devtools import redis as redis_dev

    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    fake = bin_dir / "apt-get"
    fake.write_text(f"""#!/bin/sh
echo "$*" >> {calls}
case "$1" in
  update) touch {tmp_path}/lists; exit 0 ;;
  download) [ -f {tmp_path}/lists ] && exit 0; echo "E: Unable to locate package $2" >&2; exit 100 ;;
esac
""")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    if os.geteuid() == 0:
        redis_dev._fetch(["redis-server"], tmp_path / "root")  # noqa: SLF001
        assert calls.read_text().split("\n")[:3] == ["download redis-server", "update -qq", "download redis-server"]
    else:
        with pytest.raises(redis_dev.RedisError, match="run apt-get update as root once"):
            redis_dev._fetch(["redis-server"], tmp_path / "root")  # noqa: SLF001
        assert calls.read_text().split("\n")[:2] == ["download redis-server", ""]


def test_compare_models_and_rollout_refuses_drift(kafka_bootstrap, new_topic, new_group, stream_bundle_path,
                                                  second_bundle_path, tmp_path):
    """`clickvec compare`: both bundles on the same leave-one-out cases (the training's
    split), HR@10/NDCG@10 with ties scored as the training's evaluator does; the deltas
    flip sign with the order. `clickvec rollout --compare-data` toward the worse model
    refuses in one line before writing anything."""
    from clickvec.eventfile import write_events
    from clickvec.lifecycle.compare import compare, tie_metrics
    from clickvec.training.evaluate import _tie_metrics

    rng = np.random.default_rng(0)
    g, t, ok = rng.integers(0, 30, 200), rng.integers(0, 5, 200), rng.random(200) > 0.1
    ref = _tie_metrics(g, t, 10, ok)
    for name, v in tie_metrics(g, t, 10, ok).items():
        assert np.allclose(v, ref[name]), name

    a, b = load_bundle(stream_bundle_path, providers="cpu"), load_bundle(second_bundle_path, providers="cpu")
    data = write_events(generate_events(SynthConfig(n_users=200, seed=41, mean_events=8)), tmp_path / "eval.parquet")
    ab, ba, aa = compare(a, b, data), compare(b, a, data), compare(a, a, data)
    assert ab["cases"] == ba["cases"] > 100 and ab["split"] == "loo"
    for p in ("full", "full_seen_excluded"):
        for n in ("hr@10", "ndcg@10"):
            assert 0 <= ab["old"][p][n] <= 1 and ab["old"][p][n] == ba["new"][p][n], (p, n)
            assert ab["delta"][p][n] == pytest.approx(-ba["delta"][p][n], abs=2e-5) and aa["delta"][p][n] == 0
    assert not aa["worse"] and ab["worse"] != ba["worse"], (ab["delta"], ba["delta"])
    # The training report's form: the old bundle beside this run's test metrics, same cases.
    from clickvec.lifecycle.compare import against_training, markdown

    rep = against_training(stream_bundle_path, data, "loo", {"model": ab["new"]})
    assert rep["cases"] == ab["cases"] and rep["old"] == ab["old"] and rep["worse"] == ab["worse"]
    assert all(rep["delta"][p][n] == pytest.approx(ab["delta"][p][n], abs=2e-5) for p in rep["delta"]
               for n in rep["delta"][p])
    assert "| full_seen_excluded | NDCG@10 |" in markdown(rep)
    better, worse = (stream_bundle_path, second_bundle_path) if ab["worse"] else (second_bundle_path,
                                                                                stream_bundle_path)
    src = new_topic(4, "clicks")
    r = clickvec("rollout", "--from-model", str(better), "--to-model", str(worse), "--from-group", new_group(),
                 "--group", f"{new_group()}-{{model}}", "--brokers", kafka_bootstrap, "--in", src,
                 "--out", new_topic(4, "vectors"), "--providers", "cpu", "--compare-data", str(data))
    assert r.returncode == 2, r.stdout + r.stderr[-2000:]
    phases = [json.loads(line) for line in r.stdout.splitlines()]
    assert [p["phase"] for p in phases] == ["compare"] and phases[0]["worse"], phases
    assert r.stderr.strip().splitlines()[-1].startswith("clickvec rollout: the new model is worse"), r.stderr
    print("compare:", {"cases": ab["cases"], "delta": ab["delta"]})
