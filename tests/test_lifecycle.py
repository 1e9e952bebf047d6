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

    from clickvec.client.lookup import RedisLookup, TopicLookup
    from clickvec.devtools.produce import produce_records

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
