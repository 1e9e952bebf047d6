"""The worker against a difficult upstream and a starved process, on the real broker:
a transactional producer (commit markers, aborted transactions) and a worker paused in
bursts (SIGSTOP / SIGCONT) with malformed messages mixed in."""

from __future__ import annotations

import random
import re
import signal
import threading
import time
import urllib.request
import uuid

import pytest
import stream_util as su
from test_stream_reliability import checked_outputs

from clickvec.bundle.reader import load_bundle
from clickvec.devtools.produce import produce_records
from clickvec.devtools.synth import SynthConfig, generate_events

pytestmark = [pytest.mark.broker, pytest.mark.slow]

# The worker's log lines for a hole it read back (continuity.py).
HOLE_WARNINGS = ("were not delivered by the consumer", "were consumed but never delivered")


def _metric(worker: su.WorkerProcess, name: str) -> float:
    port = worker.cmd[worker.cmd.index("--web-port") + 1]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    m = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def _transactions(producer, topic: str, chunks, fakes, first: int) -> int:
    """Each chunk of events in a committed transaction; after every third, an aborted
    one with other events of the same users' keys. Returns the aborted count."""
    aborted = 0
    for n, chunk in enumerate(chunks, start=first):
        producer.begin_transaction()
        for e in chunk:
            producer.produce(topic, e.to_bytes(), e.user_id.encode())
        producer.commit_transaction(30)
        if n % 3 == 1:
            producer.begin_transaction()
            for f in fakes[n * 20:(n + 1) * 20]:
                producer.produce(topic, f.to_bytes(), f.user_id.encode())
            producer.flush(30)
            producer.abort_transaction(30)
            aborted += 1
    return aborted


def test_transactional_upstream_no_false_holes(kafka_bootstrap, new_topic, new_group, stream_bundle_path,
                                               tmp_path):
    """Events written in transactions, some aborted, half before the worker starts and
    half while it runs: commit and abort markers take offsets no consumer sees. Aborted
    events are never applied, no gap is read back, every user exact."""
    from confluent_kafka import Producer

    src, out, dlq = new_topic(2, "txn"), new_topic(2, "vectors"), new_topic(2, "dlq")
    events = generate_events(SynthConfig(n_users=50, seed=31, mean_events=12))[:500]
    fakes = generate_events(SynthConfig(n_users=50, seed=32, mean_events=6))
    p = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"tx-{uuid.uuid4().hex}",
                  "linger.ms": 5})
    p.init_transactions(30)
    chunks = [events[i:i + 50] for i in range(0, len(events), 50)]
    aborted = _transactions(p, src, chunks[:5], fakes, 0)
    bundle = load_bundle(stream_bundle_path, providers="cpu")
    group = new_group()
    w = su.WorkerProcess(kafka_bootstrap, stream_bundle_path, src, out, dlq, group, tmp_path / "s",
                         tmp_path / "w.log").start()
    reader = su.TopicReader(kafka_bootstrap, out)
    try:
        su.wait_for(reader, lambda m: su.VectorLog.of(m).distinct() >= 250, 120, [w])
        for k in range(5, 10):  # live: the worker reads as the transactions commit
            aborted += _transactions(p, src, chunks[k:k + 1], fakes, k)
            time.sleep(0.3)
        su.wait_for(reader, lambda m: su.VectorLog.of(m).distinct() >= len(events), 120, [w])
        time.sleep(4.0)  # idle long enough for the tail-hole sweep to run (pipeline.py)
        reader.poll(1.0)
        gap_filled = _metric(w, "clickvec_events_gap_filled_total")
        assert w.alive()
    finally:
        rc = w.stop()
        reader.close()
    assert rc == 0, w.log_tail()
    assert aborted >= 3
    su.check_vectors(bundle, events, su.VectorLog.of(reader.messages))  # nothing aborted applied
    log = w.log_path.read_text(errors="replace")
    assert gap_filled == 0, f"{gap_filled} offsets read back"
    assert not any(h in log for h in HOLE_WARNINGS), [ln for ln in log.splitlines() if "delivered" in ln][:5]
    # The markers' offsets count as done: the group's commits pass every marker but the
    # last one of each partition (nothing after it shows the worker that it is there).
    committed, ends = _committed_and_ends(kafka_bootstrap, group, src, 2)
    assert committed == [e - 1 for e in ends], (committed, ends)


def _committed_and_ends(bootstrap: str, group: str, topic: str, partitions: int) -> tuple[list, list]:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        committed = [tp.offset for tp in c.committed(tps, timeout=20)]
        ends = [c.get_watermark_offsets(tp, timeout=20)[1] for tp in tps]
    finally:
        c.close()
    return committed, ends


BAD = [(b"u-bad-1", b""), (b"u-bad-2", b"\xff\xfe\x00garbage"), (b"u-bad-3", b"{not json"),
       (b"u-bad-4", b"[1, 2, 3]")]


def _pause_in_bursts(w: su.WorkerProcess, stop: threading.Event, rng: random.Random) -> int:
    """SIGSTOP / SIGCONT the worker in bursts (each pause well under the session
    timeout) until `stop`; returns the number of pauses."""
    assert w.proc is not None
    pauses = 0
    while not stop.is_set():
        time.sleep(rng.uniform(0.1, 0.8))
        w.proc.send_signal(signal.SIGSTOP)
        pauses += 1
        time.sleep(rng.uniform(0.2, 1.5))
        w.proc.send_signal(signal.SIGCONT)
    return pauses


def test_starved_worker_with_malformed_traffic(kafka_bootstrap, new_topic, new_group, stream_bundle_path,
                                               tmp_path):
    """The worker paused in bursts while events and malformed messages arrive: nothing
    lost, nothing applied twice, each dead letter once, no false hole, worker alive."""
    rng = random.Random(5)
    src, out, dlq = new_topic(4, "starve"), new_topic(4, "vectors"), new_topic(4, "dlq")
    events = generate_events(SynthConfig(n_users=200, seed=41, mean_events=12))[:2400]
    records: list[tuple[bytes | None, bytes]] = []
    for i, e in enumerate(events):
        records.append((e.user_id.encode(), e.to_bytes()))
        if i % 60 == 30:
            records.append(BAD[(i // 60) % len(BAD)])
    n_bad = len(records) - len(events)
    bundle = load_bundle(stream_bundle_path, providers="cpu")
    w = su.WorkerProcess(kafka_bootstrap, stream_bundle_path, src, out, dlq, new_group(), tmp_path / "s",
                         tmp_path / "w.log").start()
    reader, dead_reader = su.TopicReader(kafka_bootstrap, out), su.TopicReader(kafka_bootstrap, dlq)
    stop = threading.Event()
    pauser = threading.Thread(target=_pause_in_bursts, args=(w, stop, rng))
    try:
        produce_records(records[:100], kafka_bootstrap, src)
        su.wait_for(reader, lambda m: len(m) > 0, 60, [w])  # the worker runs
        pauser.start()
        # The rest in small bursts at a modest rate, while the worker is paused and resumed.
        for i in range(100, len(records), 100):
            produce_records(records[i:i + 100], kafka_bootstrap, src)
            time.sleep(rng.uniform(0.05, 0.4))
        time.sleep(3.0)
        stop.set()
        pauser.join()
        su.wait_for(reader, lambda m: su.VectorLog.of(m).distinct() >= len(events), 180, [w])
        su.wait_for(dead_reader, lambda m: len(m) >= n_bad, 60, [w])
        time.sleep(4.0)  # idle: the tail-hole sweep runs
        reader.poll(1.0)
        dead_reader.poll(1.0)
        assert w.alive(), w.log_tail()
    finally:
        stop.set()
        if pauser.is_alive():
            pauser.join()
        if w.proc is not None and w.alive():
            w.proc.send_signal(signal.SIGCONT)
        rc = w.stop()
        reader.close()
        dead_reader.close()
    dead = checked_outputs(w, rc, reader, dead_reader, bundle, events)
    offsets = [(d.partition, d.offset) for d in dead]
    assert len(offsets) == len(set(offsets)) == n_bad, f"{len(offsets)} dead letters for {n_bad} bad messages"
    log = w.log_path.read_text(errors="replace")
    assert not any(h in log for h in HOLE_WARNINGS), [ln for ln in log.splitlines() if "delivered" in ln][:5]
