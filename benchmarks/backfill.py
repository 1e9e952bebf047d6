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


def parse_and_rebuild(records: list[tuple[bytes, bytes]], bundle, batch_users: int) -> dict:
    from clickvec.lifecycle.encode import RecurrentSession, rebuild
    from clickvec.lifecycle.history import Columns, add_record

    t0 = time.perf_counter()
    cols = Columns(bundle.spec)
    for i, (k, v) in enumerate(records):
        add_record(cols, k, v, hash(k) % PARTITIONS, i)
    hist = cols.history("bench")
    t1 = time.perf_counter()
    session = RecurrentSession(bundle)
    t2 = time.perf_counter()
    built = rebuild(session, hist, batch_users=batch_users)
    t3 = time.perf_counter()
    n = hist.events
    return {"parse": {"seconds": round(t1 - t0, 3), "events_per_s": round(n / (t1 - t0))},
            "rebuild": {"seconds": round(t3 - t2, 3), "events_per_s": round(n / (t3 - t2)),
                        "onnx_seconds": round(built.infer_s, 3), "pruned_graph": session.pruned,
                        "session_build_s": round(t2 - t1, 3)}}


def end_to_end(bootstrap: str, records: list[tuple[bytes, bytes]], bundle, batch_users: int,
               workers: int = 0) -> dict:
    from clickvec.lifecycle.backfill import backfill
    from clickvec.stream.worker.config import StreamConfig

    in_topic = common.create_topic(bootstrap, "bf-in", PARTITIONS)
    out_topic = common.create_topic(bootstrap, "bf-out", PARTITIONS)
    from clickvec.devtools.produce import produce_records

    t0 = time.perf_counter()
    produce_records(records, bootstrap, in_topic)
    produce_s = time.perf_counter() - t0
    cfg = StreamConfig(model=str(bundle.path), brokers=bootstrap, in_topic=in_topic, out_topic=out_topic,
                       group=f"bf-{uuid.uuid4().hex[:8]}", providers="cpu")
    rep = backfill(cfg, bundle, batch_users=batch_users, workers=workers)
    return {"produce_s": round(produce_s, 3), "users": rep.users, "events": rep.events,
            "workers": workers or os.cpu_count(), "check_s": rep.check_s, "rebuild_s": rep.rebuild_s,
            "onnx_s": rep.onnx_s, "write_s": rep.write_s, "seconds": rep.seconds, "events_per_s": rep.events_per_s}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=50_000)
    p.add_argument("--batch-users", type=int, default=4096)
    p.add_argument("--bootstrap", help="use this broker instead of starting one")
    p.add_argument("--out", type=Path, default=common.RESULTS / "backfill.json")
    a = p.parse_args(argv)
    configure(logging.INFO)
    from clickvec.bundle.reader import load_bundle
    from clickvec.devtools import broker

    with tempfile.TemporaryDirectory(prefix="clickvec-bench-backfill-") as tmp:
        work = Path(tmp)
        bundle = load_bundle(common.make_bundle(work / "model"), providers="cpu")
        records = common.make_events(a.events, a.users)
        result = parse_and_rebuild(records, bundle, a.batch_users)
        log.info("offline: %s", result)
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
                       "loadavg_1m_at_end": round(os.getloadavg()[0], 2)},
           "note": "the broker and the backfill share this machine's cores; other jobs ran on them too"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
