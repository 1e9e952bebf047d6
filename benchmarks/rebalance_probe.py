"""Probe: does a worker taking over a departed worker's partitions keep the design's
property? Two `clickvec stream` workers share a group, one leaves with half the stream
to go, the other finishes. Repeats N times on the real local broker and reports, per
run, how many (user, seq) vectors are missing or wrong against the offline encoder, and
how many offset holes the worker had to read back (stream/continuity.py): Faust can
skip over records fetched across a rebalance, and before the hole filling about half
of these runs lost or mis-ordered events. `tests/test_stream_e2e.py` checks the same
hand-over on every CI run; this probe repeats it:
`python benchmarks/rebalance_probe.py --bundle DIR --runs 3`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402
from stream_util import TopicReader, VectorLog, WorkerProcess, wait_for  # noqa: E402

from clickvec.bundle.reader import load_bundle  # noqa: E402
from clickvec.devtools import broker  # noqa: E402
from clickvec.devtools.produce import produce_events  # noqa: E402
from clickvec.devtools.synth import SynthConfig, generate_events  # noqa: E402


def one_run(bootstrap: str, bundle_path: Path, events, tmp: Path) -> dict:
    admin = AdminClient({"bootstrap.servers": bootstrap})

    def topic() -> str:
        n = f"probe-{uuid.uuid4().hex[:10]}"
        admin.create_topics([NewTopic(n, num_partitions=4)])[n].result(30)
        return n

    src, out, dlq, group = topic(), topic(), topic(), f"probe-{uuid.uuid4().hex[:10]}"
    a = WorkerProcess(bootstrap, bundle_path, src, out, dlq, group, tmp / "a", tmp / "a.log").start()
    b = WorkerProcess(bootstrap, bundle_path, src, out, dlq, group, tmp / "b", tmp / "b.log").start()
    half = len(events) // 2
    reader = TopicReader(bootstrap, out)
    t = threading.Thread(target=produce_events, args=(events[:half], bootstrap, src), kwargs={"rate": 500.0})
    t.start()
    t.join()
    done = VectorLog.of
    try:
        wait_for(reader, lambda m: done(m).distinct() >= half, 120, [a, b])
        b.stop()
        produce_events(events[half:], bootstrap, src)
        try:
            wait_for(reader, lambda m: done(m).distinct() >= len(events), 90, [a])
        except AssertionError:
            pass
        reader.poll(1.0)
    finally:
        a.stop()
        b.stop()
        reader.close()
    log = VectorLog.of(reader.messages)
    bundle = load_bundle(bundle_path, providers="cpu")
    by_user: dict[str, list] = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    missing = wrong = 0
    import numpy as np

    for uid, evs in by_user.items():
        z = bundle.encode_offline(bundle.spec.encode_sequence(
            [e.item_id for e in evs], [e.event_type for e in evs], [e.ts for e in evs]))
        got = log.by_user.get(uid, {})
        for n in range(1, len(evs) + 1):
            msgs = got.get(n)
            if not msgs:
                missing += 1
            elif any(float(np.abs(np.asarray(m.vector, np.float32) - z[n - 1]).max()) > 1e-5 for m in msgs):
                wrong += 1
    holes = sum(f.read_text(errors="replace").count("were not delivered by the consumer")
                for f in (tmp / "a.log", tmp / "b.log") if f.exists())
    return {"events": len(events), "distinct_vectors": log.distinct(), "missing": missing, "wrong": wrong,
            "holes_filled": holes, "ok": missing == 0 and wrong == 0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--bundle", required=True, help="a model bundle directory (clickvec export)")
    p.add_argument("--brokers", help="use this broker instead of starting one")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/rebalance_probe.json"))
    args = p.parse_args()
    events = generate_events(SynthConfig(n_users=1000, seed=13, mean_events=15.6))[:12000]
    with tempfile.TemporaryDirectory() as d:
        b = None if args.brokers else broker.start(Path(d) / "kafka")
        bootstrap = args.brokers or b.bootstrap
        try:
            runs = []
            for i in range(args.runs):
                tmp = Path(d) / f"run{i}"
                tmp.mkdir()
                runs.append(one_run(bootstrap, Path(args.bundle), events, tmp))
                print(json.dumps(runs[-1]), flush=True)
        finally:
            if b is not None:
                b.stop()
    Path(args.out).write_text(json.dumps({"probe": "rebalance", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                          "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
