"""Standby replicas (`--standby-replicas`) on the real broker: two workers in one group,
one killed (SIGKILL); the survivor takes over its partitions from its standby copy,
reading only the changelog records the copy lacked, and every user stays exact."""

from __future__ import annotations

import re
import time

import pytest
import stream_util as su
from confluent_kafka import Consumer, TopicPartition

from clickvec.bundle.reader import load_bundle
from clickvec.devtools.produce import produce_events
from clickvec.devtools.synth import SynthConfig, generate_events

RESTORE = re.compile(r"changelog restore: (\d+) records .* of (\d+) offsets to read, partitions \[([\d, ]*)\]")
FAUST_READS = "Restoring state from changelog topics"


def _settled_size(bootstrap: str, topic: str, partitions: list[int], timeout: float = 30) -> int:
    """The records on the changelog `partitions` once no more arrive for 2 s (a batch's
    states are written after its vectors)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "size"})
    sizes: list[int] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            sizes.append(sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions))
            if len(sizes) >= 5 and sizes[-1] == sizes[-5] > 0:
                return sizes[-1]
            time.sleep(0.5)
    finally:
        c.close()
    raise AssertionError(f"changelog {topic} still growing after {timeout} s: {sizes[-5:]}")


def _restores(text: str) -> list[tuple[int, int, list[int]]]:
    """(records read, offsets to read, partitions) of each bulk restore in a worker log."""
    return [(int(m[1]), int(m[2]), [int(p) for p in m[3].split(",") if p.strip()]) for m in RESTORE.finditer(text)]


def _split(a: su.WorkerProcess, b: su.WorkerProcess, timeout: float = 90) -> dict[su.WorkerProcess, list[int]]:
    """Each worker's partitions (those of its last restore: one at each rebalance), once
    the two share the four."""
    deadline = time.monotonic() + timeout
    owned: dict[su.WorkerProcess, list[int]] = {}
    while time.monotonic() < deadline:
        for w in (a, b):
            assert w.alive(), w.log_tail()
            restores = _restores(w.log_path.read_text())
            owned[w] = restores[-1][2] if restores else []
        if owned[a] and owned[b] and sorted(owned[a] + owned[b]) == [0, 1, 2, 3]:
            return owned
        time.sleep(0.5)
    raise AssertionError(f"the two workers did not share the partitions within {timeout} s: {owned}")


@pytest.mark.broker
@pytest.mark.slow
def test_standby_takes_over_a_killed_workers_partitions_without_a_full_restore(
        kafka_bootstrap, new_topic, new_group, stream_bundle_path, tmp_path):
    bundle = load_bundle(stream_bundle_path, providers="cpu")
    events = generate_events(SynthConfig(n_users=400, seed=44, mean_events=10))
    cut = len(events) * 2 // 3
    phase1, phase2 = events[:cut], events[cut:]
    src, out, dlq = new_topic(4, "clicks"), new_topic(4, "vectors"), new_topic(4, "dlq")
    group = new_group()
    flags = ("--standby-replicas", "1", "--session-timeout", "6")
    a = su.WorkerProcess(kafka_bootstrap, stream_bundle_path, src, out, dlq, group, tmp_path / "a",
                         tmp_path / "a.log", *flags).start()
    b = su.WorkerProcess(kafka_bootstrap, stream_bundle_path, src, out, dlq, group, tmp_path / "b",
                         tmp_path / "b.log", *flags).start()
    reader = su.TopicReader(kafka_bootstrap, out)
    try:
        owned = _split(a, b)
        assert produce_events(phase1, kafka_bootstrap, src) == len(phase1)
        su.wait_for(reader, lambda m: su.VectorLog.of(m).distinct() >= len(phase1), 120, [a, b])
        size = _settled_size(kafka_bootstrap, f"{group}-user-state-changelog", owned[a])
        seen = len(b.log_path.read_text())
        a.kill()
        assert produce_events(phase2, kafka_bootstrap, src) == len(phase2)
        su.wait_for(reader, lambda m: su.VectorLog.of(m).distinct() >= len(events), 120, [b])
        reader.poll(1.0)
    finally:
        a.kill()
        rc = b.stop()
        reader.close()
    assert rc == 0, b.log_tail()
    stats = su.check_vectors(bundle, events, su.VectorLog.of(reader.messages))
    takeover_log = b.log_path.read_text()[seen:]
    takeover = _restores(takeover_log)
    assert takeover and sorted(takeover[-1][2]) == [0, 1, 2, 3], takeover_log[-3000:]
    read = sum(r[0] for r in takeover)
    # Without a standby copy the survivor would read the killed worker's partitions
    # whole (`size` records); with one, only what the copy had not applied.
    assert read <= 0.1 * size, f"takeover read {read} of the {size} records of partitions {owned[a]}"
    assert FAUST_READS not in takeover_log  # nor did Faust's own reader have anything left
    print("standby takeover:", {**stats, "killed_workers_partitions": owned[a], "their_changelog_records": size, "read_at_takeover": read,
                                "restores": takeover})
