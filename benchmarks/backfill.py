"""Backfill throughput (events/s) for the default-size model on this machine's cores.

Three figures over the same N synthetic events of U users (default 1,000,000 / 50,000):
- `parse`: contract JSON records -> per-user columns (what reading a topic costs in Python);
- `rebuild`: the batched ONNX Runtime rebuild of every user's state (pruned step graph
  for the history, the full graph for each user's last event);
- `end_to_end`: `clickvec backfill`'s whole run against a real broker: read the topic and
  rebuild (one process per core, each a share of the partitions), publish one vector per
  user, write every state to the changelog, commit.
`parse` and `rebuild` run in one process, one after the other.

    .venv/bin/python -m benchmarks.backfill [--events 1000000] [--users 50000] [--bootstrap HOST:PORT]

Writes benchmarks/results/backfill.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/backfill.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common
from clickvec.logsetup import configure

log = logging.getLogger("backfill")
PARTITIONS = 4
CONSUME_BATCH = 10_000  # records per consume() call in read_topic


def parse_and_rebuild(records: list[tuple[bytes, bytes]], bundle, batch_users: int) -> dict:
    """Parse (as `read_topic` does, records in batches of a consume call) then rebuild,
    in this process; wall and CPU seconds of each."""
    from clickvec.lifecycle.encode import RecurrentSession, rebuild
    from clickvec.lifecycle.history import Columns

    t0, c0 = time.perf_counter(), time.process_time()
    cols = Columns(bundle.spec)
    for a in range(0, len(records), CONSUME_BATCH):
        batch = records[a:a + CONSUME_BATCH]
        keys = [k for k, _ in batch]
        cols.add_messages(keys, [v for _, v in batch], [hash(k) % PARTITIONS for k in keys],
                          list(range(a, a + len(batch))))
    hist = cols.history("bench")
    t1, c1 = time.perf_counter(), time.process_time()
    session = RecurrentSession(bundle, 1)
    t2, c2 = time.perf_counter(), time.process_time()
    built = rebuild(session, hist, batch_users=batch_users)
    t3, c3 = time.perf_counter(), time.process_time()
    n = hist.events
    return {"parse": {"seconds": round(t1 - t0, 3), "events_per_s": round(n / (t1 - t0)),
                      "cpu_s": round(c1 - c0, 3), "events_per_cpu_s": round(n / (c1 - c0))},
            "rebuild": {"seconds": round(t3 - t2, 3), "events_per_s": round(n / (t3 - t2)),
                        "cpu_s": round(c3 - c2, 3), "events_per_cpu_s": round(n / (c3 - c2)),
                        "onnx_seconds": round(built.infer_s, 3), "pruned_graph": session.pruned,
                        "intra_op_threads": 1, "session_build_s": round(t2 - t1, 3)}}


def profile(records: list[tuple[bytes, bytes]], bundle, batch_users: int, out: Path) -> None:
    """cProfile of `parse_and_rebuild` (one process), the top functions by own time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    parse_and_rebuild(records, bundle, batch_users)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    out.write_text(f"# benchmarks/backfill.py --profile: parse + rebuild of {len(records)} events, one process "
                   f"(load: {uptime()})\n" + text.getvalue())


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def end_to_end(bootstrap: str, records: list[tuple[bytes, bytes]], bundle, batch_users: int,
               workers: int = 0) -> dict:
    from clickvec.devtools.produce import produce_records
    from clickvec.lifecycle.backfill import backfill
    from clickvec.stream.worker.config import StreamConfig

    in_topic = common.create_topic(bootstrap, "bf-in", PARTITIONS)
    out_topic = common.create_topic(bootstrap, "bf-out", PARTITIONS)
    t0 = time.perf_counter()
    produce_records(records, bootstrap, in_topic)
    produce_s = time.perf_counter() - t0
    cfg = StreamConfig(model=str(bundle.path), brokers=bootstrap, in_topic=in_topic, out_topic=out_topic,
                       group=f"bf-{uuid.uuid4().hex[:8]}", providers="cpu")
    wait_for_coordinator(cfg)
    load = uptime()
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    rep = backfill(cfg, bundle, batch_users=batch_users, workers=workers)
    own2, kids2 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime for a, b in ((own, own2), (kids, kids2)))
    return {"produce_s": round(produce_s, 3), "users": rep.users, "events": rep.events,
            "workers": workers or os.cpu_count(), "check_s": rep.check_s, "rebuild_s": rep.rebuild_s,
            "onnx_s": rep.onnx_s, "write_s": rep.write_s, "seconds": rep.seconds, "events_per_s": rep.events_per_s,
            "cpu_s": round(cpu, 3), "events_per_cpu_s": round(rep.events / cpu),
            "uptime_before": load, "uptime_after": uptime()}


def wait_for_coordinator(cfg, timeout: float = 60.0) -> None:
    """A fresh broker answers NOT_COORDINATOR until its offsets topic is loaded: wait
    for that here, not inside the timed run."""
    from clickvec.lifecycle import groupstate

    deadline = time.monotonic() + timeout
    while True:
        try:
            groupstate.committed_offsets(cfg.librdkafka(), cfg.group, cfg.in_topic, range(PARTITIONS))
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=50_000)
    p.add_argument("--batch-users", type=int, default=4096)
    p.add_argument("--bootstrap", help="use this broker instead of starting one")
    p.add_argument("--out", type=Path, default=common.RESULTS / "backfill.json")
    p.add_argument("--profile", type=Path, help="also write a cProfile of parse + rebuild to this file")
    p.add_argument("--no-offline", action="store_true", help="end to end only")
    a = p.parse_args(argv)
    configure(logging.INFO)
    from clickvec.bundle.reader import load_bundle
    from clickvec.devtools import broker

    load_before = uptime()
    with tempfile.TemporaryDirectory(prefix="clickvec-bench-backfill-") as tmp:
        work = Path(tmp)
        bundle = load_bundle(common.make_bundle(work / "model"), providers="cpu")
        records = common.make_events(a.events, a.users)
        result = {} if a.no_offline else parse_and_rebuild(records, bundle, a.batch_users)
        log.info("offline: %s", result)
        if a.profile:
            profile(records, bundle, a.batch_users, a.profile)
        b = None if a.bootstrap else broker.start(work / "kafka", reset=True)
        try:
            result["end_to_end"] = end_to_end(a.bootstrap or b.bootstrap, records, bundle, a.batch_users)
        finally:
            if b is not None:
                b.stop()
    out = {"benchmark": "backfill", "events": a.events, "users": a.users, "partitions": PARTITIONS,
           "model": "default size (item_dim 64, hidden 128, z_dim 32), 2000 items",
           "batch_users": a.batch_users, **result,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "uptime_at_start": load_before, "uptime_at_end": uptime()},
           "note": "the broker and the backfill share this machine's 2 cores with other jobs (see uptime): "
                   "events_per_s is wall clock under that load; events_per_cpu_s counts only the CPU "
                   "seconds the backfill's processes got (the broker's are not counted)"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
