"""Scaling curves for the stream worker (a) and the recompute baseline (d).

  engine:  per-event cost of `Engine.process` (+ commit_states) on a MemoryStateStore whose
           users already applied H events, H in 1..10000, against recompute re-encoding
           an H-event history per event; state bytes per user against the raw recurrent
           state (h and c); a cProfile of Engine.process on a big batch (--profile FILE).
  worker:  the real `clickvec stream` process on the broker: backlog events/s and paced
           latency against max_batch and max_wait (skip with --no-worker).

    .venv/bin/python -m benchmarks.scaling [--quick] [--no-worker] [--profile FILE]

Writes benchmarks/results/pipeline_scaling.json (+ .png).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks import common
from benchmarks.recompute import per_event_cost
from clickvec.logsetup import configure

log = logging.getLogger("scaling")
HISTORIES = (1, 10, 100, 1000, 10000)


def engine_batch(bundle: Any, users: int, history: int, seed: int = 0) -> tuple[list, Any]:
    """`users` records (one new event each) and a MemoryStateStore whose users already
    applied `history` events."""
    from clickvec.contract.events import EVENT_TYPES
    from clickvec.stream.worker.engine import MemoryStateStore, records_from
    from clickvec.stream.worker.state import UserState, model_id_prefix

    rng = np.random.default_rng(seed)
    store = MemoryStateStore()
    prefix = model_id_prefix(bundle.model_id)
    L, H = bundle.layers, bundle.hidden
    t0 = 1_767_225_600_000
    for u in range(users):
        h = (rng.standard_normal((L, H)) * 0.3).astype(np.float32)
        st = UserState(prefix, history, u % 4, history, t0 + history * 1000, h, h.copy())
        store.data[f"u{u}"] = st.pack()
    items = []
    for u in range(users):
        uid = f"u{u}"
        v = json.dumps({"user_id": uid, "item_id": f"item-{int(rng.integers(0, common.N_ITEMS))}",
                        "event_type": EVENT_TYPES[u % len(EVENT_TYPES)], "ts": t0 + history * 1000 + 500},
                       separators=(",", ":")).encode()
        items.append((uid.encode(), v, u % 4, history + 1))
    return records_from(items), store


def engine_cost(engine: Any, records: list, store: Any, min_seconds: float) -> float:
    """Seconds per event of process + commit_states, states reset between calls."""
    snapshot = dict(store.data)
    times = []
    t_end = time.perf_counter() + min_seconds
    while len(times) < 3 or time.perf_counter() < t_end:
        store.data = dict(snapshot)
        t0 = time.perf_counter()
        r = engine.process(records, store)
        engine.commit_states(r, store)
        times.append(time.perf_counter() - t0)
        assert r.applied == len(records), r.applied
    return float(np.median(times)) / len(records)


def profile_engine(engine: Any, bundle: Any, out: Path, users: int = 1024, rounds: int = 20) -> None:
    records, store = engine_batch(bundle, users, 100)
    snapshot = dict(store.data)
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    for _ in range(rounds):
        store.data = dict(snapshot)
        pr.enable()
        engine.commit_states(engine.process(records, store), store)
        pr.disable()
    dt = time.perf_counter() - t0
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22)
    head = (f"cProfile of Engine.process + commit_states, MemoryStateStore, {rounds} batches of {users} users x 1 event"
            f" (history 100), {1e6 * dt / (rounds * users):.1f} us/event with the profiler on; "
            f"load average {os.getloadavg()[0]:.2f}; engine config {engine.cfg}\n")
    out.write_text(head + s.getvalue())


def worker_curves(bundle_path: Path, quick: bool) -> list[dict[str, Any]]:
    from benchmarks.pipeline import WARM_S, backlog_run, paced_run

    rows = []
    n = 20_000 if quick else 40_000
    events = common.make_events(n, 2000, seed=1)
    warm = [(b"w" + k, v.replace(b'"user_id":"u', b'"user_id":"wu')) for k, v in common.make_events(100, 100, seed=3)]
    with tempfile.TemporaryDirectory(prefix="clickvec-scaling-") as tmp:
        from clickvec.devtools import broker as broker_mod

        broker = broker_mod.start(Path(tmp) / "kafka")
        try:
            ctx = {"bootstrap": broker.bootstrap, "work": Path(tmp), "bundle": bundle_path, "partitions": 4}
            settings = [(64, 0.02), (256, 0.02), (1024, 0.02), (1024, 0.005), (1024, 0.05)]
            if quick:
                settings = [(64, 0.02), (1024, 0.02), (1024, 0.005)]
            for mb, mw in settings:
                b = backlog_run("clickvec", events, ctx, 10.0 if quick else 20.0, mb, mw)
                rate = max(100, round(b["events_per_s"] / 2))
                paced_s = 5.0 if quick else 8.0
                paced = common.make_events(int(rate * (paced_s + WARM_S)) + 500, 2000, seed=2)
                p = paced_run("clickvec", paced, warm, rate, paced_s, ctx, 10.0, mb, mw)
                rows.append({"max_batch": mb, "max_wait": mw, "events_per_s": b["events_per_s"],
                             "paced_rate": rate, "latency_ms": p["latency_ms"],
                             "delivered_fraction": p["delivered_fraction"]})
        finally:
            broker.stop()
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-worker", action="store_true", help="engine-level curves only (no broker)")
    p.add_argument("--profile", type=Path, default=None, help="write a cProfile of Engine.process here")
    p.add_argument("--out", type=Path, default=common.RESULTS / "pipeline_scaling.json")
    a = p.parse_args(argv)
    configure(logging.INFO)
    from clickvec.bundle.reader import load_bundle
    from clickvec.stream.worker.engine import Engine
    from clickvec.stream.worker.state import HEADER_BYTES

    load_before = list(os.getloadavg())
    res: dict[str, Any] = {"benchmark": "pipeline_scaling", "what": __doc__.split("\n\n")[1].strip()}
    with tempfile.TemporaryDirectory(prefix="clickvec-scaling-") as tmp:
        bundle_path = common.make_bundle(Path(tmp))
        bundle = load_bundle(bundle_path, providers="cpu", intra_op_threads=1)
        engine = Engine(bundle)
        res["model"] = {"dims": bundle.manifest["dims"], "intra_op_threads": 1}
        if a.profile:
            profile_engine(engine, bundle, a.profile)
            log.info("profile written to %s", a.profile)
        secs = 0.5 if a.quick else 1.5
        hist_rows = []
        # clickvec's cost is measured in interleaved rounds (every history length once
        # per round, median over rounds): a busy second on the shared machine then
        # lands on all lengths alike instead of on whichever ran at that moment.
        batches = {hlen: engine_batch(bundle, 1024, hlen) for hlen in HISTORIES}
        initial = {hlen: dict(store.data) for hlen, (_, store) in batches.items()}
        rounds: dict[int, list[float]] = {hlen: [] for hlen in HISTORIES}
        for _ in range(3 if a.quick else 7):
            for hlen in HISTORIES:
                records, store = batches[hlen]
                store.data = dict(initial[hlen])
                rounds[hlen].append(engine_cost(engine, records, store, secs / 3))
        for hlen in HISTORIES:
            a_cost = float(np.median(rounds[hlen]))
            d_cost = per_event_cost(bundle, hlen, secs)
            hist_rows.append({"history": hlen, "clickvec_us_per_event": a_cost * 1e6,
                              "clickvec_rounds_us": [round(x * 1e6, 2) for x in rounds[hlen]],
                              "recompute_us_per_event": d_cost * 1e6})
            log.info("history %5d: clickvec %7.1f us/event   recompute %10.1f us/event", hlen, a_cost * 1e6,
                     d_cost * 1e6)
        res["per_event_vs_history"] = {
            "clickvec": "Engine.process + commit_states on MemoryStateStore, batches of 1024 users x 1 event",
            "recompute": "one ORT call over the user's whole history (B=1, T=history+1) per event",
            "rows": hist_rows,
        }
        raw = 2 * bundle.layers * bundle.hidden * 4
        for dt in ("f32", "f16"):
            records, store = engine_batch(bundle, 8, 10)
            engine_dt = Engine(bundle, type(engine.cfg)(state_dtype=dt))
            engine_dt.commit_states(engine_dt.process(records, store), store)
            nbytes = float(np.mean([len(v) for v in store.data.values()]))
            res.setdefault("state_bytes", {})[dt] = {
                "bytes_per_user": nbytes, "raw_recurrent_state_bytes_f32": raw, "ratio_to_raw": nbytes / raw,
                "header_bytes": HEADER_BYTES,
                "note": "value stored in RocksDB and the changelog; key (user id) and RocksDB/Kafka record "
                        "overheads not included"}
        if not a.no_worker:
            res["worker_vs_batching"] = worker_curves(bundle_path, a.quick)
    res["versions"] = common.versions()
    res["machine"] = {**common.machine_info(), "load_average_before": load_before}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    _plot(res, a.out.with_suffix(".png"))
    print(json.dumps({k: res[k] for k in ("per_event_vs_history", "state_bytes")}, indent=1))


def _plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["per_event_vs_history"]["rows"]
    wk = res.get("worker_vs_batching") or []
    fig, axes = plt.subplots(1, 2 if wk else 1, figsize=(11 if wk else 6, 4), squeeze=False)
    ax = axes[0][0]
    hs = [r["history"] for r in rows]
    ax.loglog(hs, [r["clickvec_us_per_event"] for r in rows], "o-", label="clickvec (state)")
    ax.loglog(hs, [r["recompute_us_per_event"] for r in rows], "s-", label="recompute (history)")
    ax.set_xlabel("events already applied per user")
    ax.set_ylabel("us per event")
    ax.legend()
    if wk:
        ax = axes[0][1]
        labels = [f"{r['max_batch']}/{r['max_wait'] * 1e3:.0f}ms" for r in wk]
        ax.bar(labels, [r["events_per_s"] for r in wk], color="C0")
        ax.set_ylabel("backlog events/s", color="C0")
        ax2 = ax.twinx()
        ax2.plot(labels, [r["latency_ms"]["p99"] or 0 for r in wk], "o-", color="C3")
        ax2.set_ylabel("p99 ms at half rate", color="C3")
        ax.set_xlabel("max_batch / max_wait")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
