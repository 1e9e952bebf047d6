"""The state TTL with 1M users: state size on disk before and after eviction, and what the
eviction costs per event.

Drives the worker's engine (`Engine.process` / `commit_states`, the TTL included) on a
real RocksDB (rocksdict, one database per partition as Faust's table keeps them, the
same `scan_expired` cursor as `TableStore`) without Kafka: filling 1M users through the
broker and the worker's changelog would take most of an hour on this 2-core machine, and
the eviction's own work is the RocksDB scan and deletes. Not measured: the changelog
tombstones (one librdkafka produce per evicted user, sent from librdkafka's thread) and
the vector-topic tombstones.

`--users` users are stored (a default-size model: 1,064-byte values), half of them idle
for twice the TTL. Then batches of `--batch` events from the other half are processed
alternately through an engine with the TTL off (the baseline) and one with it on (so
load drifts alike for both), until every idle user is gone. The TTL's own cost per event
is its scan plus the extra RocksDB writes (the deletes); the difference of the two
runs' totals includes the machine's noise (6 jobs shared its 2 cores).

    .venv/bin/python -m benchmarks.state_ttl [--users 1000000] [--ttl-scan 1000]
"""

from __future__ import annotations

import argparse
import json
import logging
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/state_ttl.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks import common
from clickvec.logsetup import configure

log = logging.getLogger("state_ttl")
PARTITIONS = 4
T0 = 1_767_225_600_000
TTL_MS = 3_600_000
_TS = struct.Struct("<q")


def open_store(root: Path) -> Any:
    """A `StateStore` on PARTITIONS rocksdict databases, written as `TableStore` writes
    them (one WriteBatch per partition), expired with its `scan_expired` cursor."""
    from rocksdict import Options, Rdict, WriteBatch

    from clickvec.stream.worker.engine import StateStore
    from clickvec.stream.worker.table import scan_expired

    class RocksStore(StateStore):
        def __init__(self) -> None:
            opts = Options(raw_mode=True)
            opts.set_write_buffer_size(16 << 20)
            opts.set_max_write_buffer_number(2)
            self.dbs = [Rdict(str(root / f"p{p}"), options=opts) for p in range(PARTITIONS)]
            self.cursors: list[bytes | None] = [None] * PARTITIONS
            self.next = 0
            self.scan_s = 0.0
            self.write_s = 0.0
            self.scanned = 0  # values the TTL examined

        def get(self, user_id: str, record: Any) -> bytes | None:
            return self.dbs[record.partition].get(user_id.encode())

        def put(self, user_id: str, value: bytes, record: Any) -> None:
            self.put_many([(user_id, value, record)])

        def delete(self, user_id: str, record: Any) -> None:
            self.put_many([(user_id, None, record)])

        def put_many(self, states: Any) -> None:
            t0 = time.perf_counter()
            batches: dict[int, Any] = {}
            for uid, value, rec in states:
                wb = batches.setdefault(rec.partition, WriteBatch(raw_mode=True))
                if value is None:
                    wb.delete(uid.encode())
                else:
                    wb.put(uid.encode(), value)
            for p, wb in batches.items():
                self.dbs[p].write(wb)
            self.write_s += time.perf_counter() - t0

        def expired(self, cutoff_ts: int, budget: int) -> list[tuple[str, int, bytes]]:
            t0 = time.perf_counter()
            out: list[tuple[str, int, bytes]] = []
            for k in range(PARTITIONS):
                if budget <= 0:
                    break
                p = (self.next + k) % PARTITIONS
                found, self.cursors[p], n = scan_expired(self.dbs[p], self.cursors[p], cutoff_ts, budget)
                out += [(key.decode(), p, v) for key, v in found]
                budget -= n
                self.scanned += n
            self.next += 1
            self.scan_s += time.perf_counter() - t0
            return out

        def size_bytes(self) -> int:
            return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())

        def flush(self, compact: bool = False) -> None:
            for db in self.dbs:
                db.flush()
                if compact:
                    db.compact_range(None, None)

    return RocksStore()


def partition_of(uid: str) -> int:
    return zlib.crc32(uid.encode()) % PARTITIONS


def fill(store: Any, bundle: Any, users: int) -> tuple[float, int]:
    """`users` stored states; the odd ones idle for twice the TTL. Returns (seconds, idle)."""
    from clickvec.stream.worker.engine import Record
    from clickvec.stream.worker.state import UserState, model_id_prefix

    prefix = model_id_prefix(bundle.model_id)
    rng = np.random.default_rng(0)
    shape = (bundle.layers, bundle.hidden)
    # Distinct random states, so RocksDB compresses them no better than real ones.
    pool = [UserState(prefix, 7, -1, -1, T0, rng.normal(0, 0.3, shape).astype(np.float32),
                      rng.normal(0, 0.3, shape).astype(np.float32)).pack() for _ in range(4096)]
    at = 32  # the header's last event time (state.py layout)
    t0 = time.perf_counter()
    chunk = []
    for u in range(users):
        uid = f"u{u}"
        v = pool[u % len(pool)]
        if u % 2:
            v = v[:at] + _TS.pack(T0 - 2 * TTL_MS) + v[at + 8:]
        chunk.append((uid, v, Record(None, None, "clicks", partition_of(uid), -1)))
        if len(chunk) == 20_000:
            store.put_many(chunk)
            chunk = []
    store.put_many(chunk)
    return time.perf_counter() - t0, users // 2


def batches(users: int, batch: int, seed: int, n_items: int = common.N_ITEMS):
    """Endless batches of events of the active (even) users, in time order."""
    from clickvec.contract.events import EVENT_TYPES
    from clickvec.stream.worker.engine import Record

    rng = np.random.default_rng(seed)
    offsets = [0] * PARTITIONS
    ts = T0 + 1000
    while True:
        recs = []
        for u, it, et in zip((2 * rng.integers(0, users // 2, batch)).tolist(),
                             rng.integers(0, n_items, batch).tolist(),
                             rng.integers(0, len(EVENT_TYPES), batch).tolist(), strict=True):
            uid = f"u{u}"
            ts += 5
            p = partition_of(uid)
            value = json.dumps({"user_id": uid, "item_id": f"item-{it}", "event_type": EVENT_TYPES[et],
                                "ts": ts}, separators=(",", ":")).encode()
            recs.append(Record(uid.encode(), value, "clicks", p, offsets[p]))
            offsets[p] += 1
        yield recs


class Timer:
    """Per-event times of one engine's batches (`process` with the TTL's scan, and
    `commit_states` with its deletes), and the store's share of them."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.batches = self.events = self.evicted = 0
        self.process_s = self.commit_s = self.scan_s = self.write_s = 0.0

    def batch(self, store: Any, recs: list[Any]) -> None:
        scan0, write0 = store.scan_s, store.write_s
        t0 = time.perf_counter()
        res = self.engine.process(recs, store)
        t1 = time.perf_counter()
        self.engine.commit_states(res, store)
        self.commit_s += time.perf_counter() - t1
        self.process_s += t1 - t0
        self.scan_s += store.scan_s - scan0
        self.write_s += store.write_s - write0
        self.batches += 1
        self.events += len(recs)
        self.evicted += res.evicted

    def summary(self) -> dict[str, Any]:
        per = 1e6 / max(1, self.events)
        return {"batches": self.batches, "events": self.events, "evicted": self.evicted,
                "process_us_per_event": round(self.process_s * per, 2),
                "commit_us_per_event": round(self.commit_s * per, 2),
                "total_us_per_event": round((self.process_s + self.commit_s) * per, 2),
                "ttl_scan_us_per_event": round(self.scan_s * per, 2),
                "rocksdb_write_us_per_event": round(self.write_s * per, 2)}


def run(bundle: Any, store: Any, feed: Any, idle: int, ttl_scan: int) -> tuple[Timer, Timer]:
    """Batches alternately through an engine without and with the TTL (so the machine's
    load drifts the same for both), until the TTL has evicted every idle user."""
    from clickvec.stream.worker.engine import Engine, EngineConfig

    off = Timer(Engine(bundle))
    on = Timer(Engine(bundle, EngineConfig(state_ttl_ms=TTL_MS, ttl_scan=ttl_scan)))
    while on.evicted < idle:
        off.batch(store, next(feed))
        on.batch(store, next(feed))
        if on.batches % 50 == 0:
            log.info("%d batch pairs, %d of %d idle users evicted", on.batches, on.evicted, idle)
    return off, on


def steady(bundle: Any, store: Any, feed: Any, ttl_scan: int, pairs: int) -> tuple[Timer, Timer]:
    """The same, once nothing is left to evict: the scan's cost alone."""
    from clickvec.stream.worker.engine import Engine, EngineConfig

    off = Timer(Engine(bundle))
    on = Timer(Engine(bundle, EngineConfig(state_ttl_ms=TTL_MS, ttl_scan=ttl_scan)))
    for _ in range(pairs):
        off.batch(store, next(feed))
        on.batch(store, next(feed))
    return off, on


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=1024)
    # The worker's default is 1,000 a batch; more here makes the 1M-user pass take fewer
    # batches (the cost per value examined does not change; per event it scales with it).
    p.add_argument("--ttl-scan", type=int, default=5000, help="values the TTL examines per batch")
    p.add_argument("--out", type=Path, default=common.RESULTS / "state_ttl.json")
    args = p.parse_args(argv)
    configure(logging.INFO)
    from clickvec.bundle.reader import load_bundle

    with tempfile.TemporaryDirectory(prefix="state-ttl-") as tmp:
        root = Path(tmp)
        bundle = load_bundle(common.make_bundle(root / "model"), providers="cpu", intra_op_threads=1)
        store = open_store(root / "db")
        fill_s, idle = fill(store, bundle, args.users)
        store.flush(compact=True)
        size_before = store.size_bytes()
        log.info("filled %d users in %.1fs: %.1f MB on disk", args.users, fill_s, size_before / 1e6)
        feed = batches(args.users, args.batch, seed=1)
        t0 = time.perf_counter()
        off_t, on_t = run(bundle, store, feed, idle, args.ttl_scan)
        off, on = off_t.summary(), on_t.summary()
        log.info("TTL off: %s", off)
        log.info("TTL on: %s (%.0fs)", on, time.perf_counter() - t0)
        s_off, s_on = (t.summary() for t in steady(bundle, store, feed, args.ttl_scan, 30))
        scan_total_s = store.scan_s
        log.info("nothing left to evict: TTL off %s, on %s", s_off, s_on)
        store.flush()
        size_after = store.size_bytes()
        store.flush(compact=True)
        size_compacted = store.size_bytes()
        left = sum(1 for db in store.dbs for _ in db.keys())
    result = {
        "what": "state TTL on a real RocksDB, engine level, no Kafka (module docstring)",
        "users": args.users, "idle_users": idle, "active_users": args.users - idle, "batch": args.batch,
        "ttl_scan_per_batch": args.ttl_scan, "ttl_ms": TTL_MS, "fill_seconds": round(fill_s, 1),
        "disk_bytes_before": size_before, "disk_bytes_after_eviction": size_after,
        "disk_bytes_after_compaction": size_compacted, "keys_left": left,
        "bytes_per_user_before": round(size_before / args.users, 1),
        "ttl_off": off, "ttl_on": on,
        "after_eviction": {"ttl_off": s_off, "ttl_on": s_on,
                           "scan_us_per_event": s_on["ttl_scan_us_per_event"]},
        "values_examined": store.scanned,
        "scan_us_per_value_examined": round(scan_total_s / max(1, store.scanned) * 1e6, 2),
        # The TTL's own work (scan + deletes), and the difference of the alternated runs.
        "eviction_cost_us_per_event": round(on["ttl_scan_us_per_event"] + on["rocksdb_write_us_per_event"]
                                            - off["rocksdb_write_us_per_event"], 2),
        "total_difference_us_per_event": round(on["total_us_per_event"] - off["total_us_per_event"], 2),
        "machine": common.machine_info(), "versions": common.versions(),
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "versions")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
