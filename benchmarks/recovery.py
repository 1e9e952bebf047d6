"""Recovery from the changelog after losing the local RocksDB, against number of users.

For each N: a changelog topic holding N user states (the worker's own value format,
each user on the partition of its key, as the worker writes it), an input topic with
one event for each of a few probe users, and a `clickvec stream` worker started on an
*empty* state directory. Faust rebuilds the table from the changelog before it
processes anything, so the time until the probe users' vectors arrive, minus the same
time with an empty changelog, is the recovery time. Each probe vector must carry
`seq` = stored seq + 1: the recovered state was used. Also reported: the worker's peak
RSS, the size of the rebuilt RocksDB directory, what the worker's bulk restore logged
(records, seconds, time waiting for fetches and in RocksDB writes; absent from workers
before it existed) and whether Faust's own changelog reader still had records to read.

    .venv/bin/python -m benchmarks.recovery [--users 10000 100000 1000000] [--bootstrap HOST:PORT]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/recovery.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks import common
from benchmarks.common import Child, Reader, create_topic
from benchmarks.pipeline import command
from clickvec.logsetup import configure

log = logging.getLogger("recovery")
PARTITIONS = 4
STORED_SEQ = 7


def fill_changelog(bootstrap: str, topic: str, users: int, bundle: Any) -> float:
    """N state values keyed by user id, each on the partition its input events use."""
    from confluent_kafka import Producer

    from clickvec.kafka import produce_waiting
    from clickvec.stream.worker.state import UserState, model_id_prefix

    prefix = model_id_prefix(bundle.model_id)
    rng = np.random.default_rng(0)
    # Distinct random states (a pool larger than a RocksDB block holds), so neither
    # RocksDB nor the broker compresses them better than real ones.
    shape = (bundle.layers, bundle.hidden)
    pool = [UserState(prefix, STORED_SEQ, -1, -1, 1_767_225_600_000,
                      rng.normal(0, 0.3, shape).astype(np.float32),
                      rng.normal(0, 0.3, shape).astype(np.float32)).pack() for _ in range(4096)]
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4",
                  "batch.num.messages": 10000, "queue.buffering.max.messages": 1_000_000,
                  "acks": "all"})  # default partitioner, as `produce_events` (the input) uses
    t0 = time.perf_counter()
    for i in range(users):
        produce_waiting(p, topic, f"r{i:07d}".encode(), pool[i % len(pool)])
        if i % 10000 == 0:
            p.poll(0)
    if p.flush(300):
        raise RuntimeError("changelog fill not delivered")
    return time.perf_counter() - t0


def one(bootstrap: str, bundle_path: Path, bundle: Any, users: int, work: Path) -> dict[str, Any]:
    from confluent_kafka.admin import AdminClient, NewTopic

    from clickvec.contract.events import ClickEvent
    from clickvec.devtools.produce import produce_events

    in_topic = create_topic(bootstrap, "rec-in", PARTITIONS)
    out_topic = create_topic(bootstrap, "rec-out", PARTITIONS)
    state_dir = work / f"state-{uuid.uuid4().hex[:6]}"
    # At info level the worker logs what its bulk restore read (recorded below).
    cmd = command("clickvec", bundle_path, bootstrap, in_topic, out_topic, state_dir, 1024, 0.005,
                  ["--loglevel", "info"])
    group = cmd[cmd.index("--group") + 1]
    changelog = f"{group}-user-state-changelog"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(changelog, num_partitions=PARTITIONS,
                                  config={"cleanup.policy": "compact"})])[changelog].result(30)
    fill_s = fill_changelog(bootstrap, changelog, users, bundle) if users else 0.0
    # Probe users: stored ones (seq continues at STORED_SEQ + 1) or, with no states, new.
    probes = [f"r{i:07d}" for i in range(0, max(users, 1), max(1, users // 8))][:8]
    produce_events([ClickEvent(u, "item-1", "view", 1_767_225_660_000) for u in probes], bootstrap, in_topic)
    reader = Reader(bootstrap, out_topic)
    child = Child(cmd, work / f"worker-{users}.log").start()
    t0 = time.perf_counter()
    try:
        deadline = t0 + 900
        while len(reader.values) < len(probes):
            reader.poll(0.1)
            if time.perf_counter() > deadline or not child.alive():
                raise RuntimeError(f"{users} users: probe vectors missing\n{child.log_tail()}")
        ready_s = time.perf_counter() - t0
        rss = child.peak_rss_mb()
    finally:
        child.stop()
        reader.close()
    seqs = sorted({json.loads(v)["seq"] for v in reader.values})
    want = STORED_SEQ + 1 if users else 1
    if seqs != [want]:
        raise RuntimeError(f"{users} users: probe vectors have seq {seqs}, expected {want}: state not recovered")
    disk = sum(f.stat().st_size for f in state_dir.rglob("*") if f.is_file())
    text = child.log_path.read_text(errors="replace")
    holes = text.count("never delivered") + text.count("not delivered by the consumer")
    restores = [line.split("changelog restore: ", 1)[1] for line in text.splitlines() if "changelog restore: " in line]
    faust_reads = text.count("Restoring state from changelog topics")
    r = {"users": users, "changelog_fill_s": fill_s, "start_to_first_vectors_s": ready_s,
         "worker_peak_rss_mb": rss, "rocksdb_dir_mb": disk / 2**20, "probe_seq": seqs[0],
         "holes_read_back": holes, "bulk_restore_log": restores, "faust_recovery_reads": faust_reads}
    log.info("%s", r)
    return r


def _restore_figures(lines: list[str]) -> dict[str, Any]:
    """The worker's own account of its bulk restores (their records and seconds)."""
    found = [re.match(r"(\d+) records in ([\d.]+) s", line) for line in lines]
    records = sum(int(m[1]) for m in found if m)
    seconds = sum(float(m[2]) for m in found if m)
    return {"restore_records": records, "restore_s": seconds,
            "restore_users_per_s": records / seconds if seconds > 0 else None}


def main(argv: list[str] | None = None) -> None:
    configure(logging.INFO)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--bootstrap", help="use this broker instead of starting one")
    p.add_argument("--out", default=str(common.RESULTS / "recovery.json"))
    a = p.parse_args(argv)
    from clickvec.bundle.reader import load_bundle
    from clickvec.devtools import broker

    with tempfile.TemporaryDirectory(prefix="clickvec-recovery-") as d:
        work = Path(d)
        b = None if a.bootstrap else broker.start(work / "kafka", reset=True)  # a fresh broker per run
        bootstrap = a.bootstrap or b.bootstrap
        try:
            bundle_path = common.make_bundle(work)
            bundle = load_bundle(bundle_path, providers="cpu")
            machine_before = common.machine_info()
            # The start-up without a changelog, before and after the sizes: on a loaded
            # machine one start can take seconds longer than the next; the shorter is
            # subtracted (noise only adds time).
            base = one(bootstrap, bundle_path, bundle, 0, work)
            rows = [one(bootstrap, bundle_path, bundle, n, work) for n in a.users]
            base_after = one(bootstrap, bundle_path, bundle, 0, work)
            start_s = min(base["start_to_first_vectors_s"], base_after["start_to_first_vectors_s"])
            for r in rows:
                r["recovery_s"] = r["start_to_first_vectors_s"] - start_s
                r["users_per_s"] = r["users"] / r["recovery_s"] if r["recovery_s"] > 0 else None
                r.update(_restore_figures(r["bulk_restore_log"]))
        finally:
            if b is not None:
                b.stop()
    res = {"benchmark": "recovery", "what": __doc__.split("\n\n")[0], "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "partitions": PARTITIONS, "state_bytes_per_user": 40 + 2 * 4 * bundle.layers * bundle.hidden,
           "baseline_empty_changelog": base, "baseline_after": base_after, "rows": rows, "versions": common.versions(),
           "machine": {**common.machine_info(), "load_average_before": machine_before["load_average"]},
           "note": "the broker and the worker share this machine's 2 cores"}
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
