"""The engine alone (no Kafka, no Faust): CPU microseconds per event of `Engine.process`
+ `commit_states` on a dict store, 100k events from 2,000 users in batches of 1,024 over 4
partitions, default-size model (benchmarks/cpu_per_event.py measures the whole worker).

    .venv/bin/python benchmarks/engine_cpu.py [TREE] [--profile]

TREE: a source tree (an export of another commit) to take `clickvec` from instead of this
checkout, so that two versions compare on the same machine minutes apart.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def _use_tree(tree: str) -> None:
    import __editable___clickvec_0_1_0_finder as f  # the editable install's finder (reads MAPPING at import)

    for table in (f.MAPPING, f.NAMESPACES):
        for k, v in list(table.items()):
            table[k] = [p.replace(str(HERE), tree, 1) for p in v] if isinstance(v, list) else v.replace(
                str(HERE), tree, 1)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    sys.path[:] = [p for p in sys.path if p not in ("", str(HERE), str(HERE / "benchmarks"))]
    if args:
        _use_tree(str(Path(args[0]).resolve()))
    spec = importlib.util.spec_from_file_location("bench_common", HERE / "benchmarks" / "common.py")
    assert spec is not None and spec.loader is not None
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    from clickvec.bundle.reader import load_bundle
    from clickvec.stream.worker.engine import Engine, MemoryStateStore, PendingStates, Record

    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(common.make_bundle(Path(tmp)), providers="cpu", intra_op_threads=1)
    records, offsets = [], [0] * 4
    for k, v in common.make_events(100_000, 2000, seed=1):
        p = int.from_bytes(k, "little") % 4
        records.append(Record(k, v, "clicks", p, offsets[p]))
        offsets[p] += 1
    engine = Engine(bundle)

    def run() -> float:
        store = PendingStates(MemoryStateStore())
        infer = 0.0
        for i in range(0, len(records), 1024):
            r = engine.process(records[i:i + 1024], store)
            infer += r.infer_s
            engine.commit_states(r, store)
        return infer

    run()  # warm-up
    c0 = time.thread_time()
    infer = run()
    cpu = time.thread_time() - c0
    print(json.dumps({"tree": args[0] if args else str(HERE), "engine_cpu_us_per_event": 1e6 * cpu / len(records),
                      "onnx_wall_us_per_event": 1e6 * infer / len(records)}))
    if "--profile" in sys.argv:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(run)
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
