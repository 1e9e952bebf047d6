"""A/B of the backfill's compute path in CPU-seconds, for old and new code alike
(results/backfill_ab.json): parse, rebuild (one ONNX Runtime thread), `backfill()` end to end.

    .venv/bin/python -m benchmarks.backfill_ab HOST:PORT OUT.json
    # the old code: an exported commit in DIR, run from DIR with PYTHONPATH=DIR

Uses the bundle at $CLICKVEC_AB_BUNDLE (default /tmp/bfp/model/bundle, made by
benchmarks.common.make_bundle) so both sides run the same model.
"""
import json
import os
import resource
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.getcwd())
from benchmarks import common
from clickvec.bundle.reader import load_bundle
from clickvec.devtools.produce import produce_records
from clickvec.lifecycle import history as H
from clickvec.lifecycle.backfill import backfill
from clickvec.lifecycle.encode import RecurrentSession, rebuild
from clickvec.stream.worker.config import StreamConfig


def main():
    bs, out = sys.argv[1], sys.argv[2]
    recs = common.make_events(1_000_000, 50_000)
    bundle = load_bundle(os.environ.get("CLICKVEC_AB_BUNDLE", "/tmp/bfp/model/bundle"), providers="cpu")
    up0 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    t, c = time.perf_counter(), time.process_time()
    cols = H.Columns(bundle.spec)
    if hasattr(cols, "add_messages"):
        for a in range(0, len(recs), 10000):
            b = recs[a:a + 10000]
            k = [x for x, _ in b]
            cols.add_messages(k, [v for _, v in b], [hash(x) % 4 for x in k], list(range(a, a + len(b))))
    else:
        for i, (k, v) in enumerate(recs):
            H.add_record(cols, k, v, hash(k) % 4, i)
    hist = cols.history("b")
    parse = (time.perf_counter() - t, time.process_time() - c)
    s = RecurrentSession(bundle, 1)
    t, c = time.perf_counter(), time.process_time()
    rebuild(s, hist)
    reb = (time.perf_counter() - t, time.process_time() - c)
    tin = common.create_topic(bs, "bf-in", 4)
    tout = common.create_topic(bs, "bf-out", 4)
    produce_records(recs, bs, tin)
    cfg = StreamConfig(model=str(bundle.path), brokers=bs, in_topic=tin, out_topic=tout,
                       group=f"bf-{uuid.uuid4().hex[:8]}", providers="cpu")
    up1 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    r0 = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    rep = backfill(cfg, bundle)
    r1 = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime for a, b in zip(r0, r1, strict=True))
    n = 1_000_000
    res = {"code": H.__file__, "parse_wall_s": round(parse[0], 2), "parse_cpu_s": round(parse[1], 2),
           "parse_events_per_cpu_s": round(n / parse[1]), "rebuild_1thread_wall_s": round(reb[0], 2),
           "rebuild_1thread_cpu_s": round(reb[1], 2), "rebuild_events_per_cpu_s": round(n / reb[1]),
           "e2e_seconds": rep.seconds, "e2e_events_per_s": rep.events_per_s, "e2e_cpu_s": round(cpu, 2),
           "e2e_events_per_cpu_s": round(n / cpu), "write_s": rep.write_s,
           "uptime_start": up0, "uptime_e2e": up1,
           "uptime_end": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    print(json.dumps(res))
    open(out, "w").write(json.dumps(res, indent=1) + "\n")

if __name__ == "__main__":
    main()
