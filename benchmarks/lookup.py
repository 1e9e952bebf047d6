"""Latest-vector lookup latency from Redis: 1M users loaded (the hashes `clickvec
serve-redis` writes, through its own write path, pipelined), then random single-user
`RedisLookup.get` calls, one at a time from one client, and `get_many` batches.

    .venv/bin/python -m benchmarks.lookup [--users 1000000] [--gets 20000] [--redis-url URL]

Starts its own redis-server (clickvec.devtools.redis) unless --redis-url. Writes
benchmarks/results/lookup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/lookup.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks import common

DIM = 32  # the default model's vector size


def load(url: str, users: int, prefix: str, batch: int = 10_000) -> dict:
    """`users` vectors through the sink's own write (Lua: newer seq only), pipelined."""
    from clickvec.contract.messages import VectorMessage
    from clickvec.lifecycle.redis_sink import RedisLatest, connect

    sink = RedisLatest(connect(url), prefix)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for start in range(0, users, batch):
        vecs = rng.normal(0, 1, (min(batch, users - start), DIM)).astype(np.float32)
        sink.write([(0, None, VectorMessage(f"u{start + i}", "m" * 64, 7, 1_767_225_600_000, 1_767_225_600_001,
                                            vecs[i], 1.5)) for i in range(len(vecs))])
    dt = time.perf_counter() - t0
    return {"users": users, "seconds": round(dt, 2), "writes_per_s": round(users / dt),
            "written": sink.stats.written, "used_memory_mb": round(sink.client.info("memory")["used_memory"] / 2**20)}


def percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3),
            "p999_ms": round(float(np.percentile(a, 99.9)), 3), "mean_ms": round(float(a.mean()), 3), "n": len(a)}


def gets(url: str, users: int, n: int, prefix: str, many: int = 100) -> dict:
    from clickvec.client.lookup import RedisLookup

    lookup = RedisLookup(url, prefix=prefix)
    rng = np.random.default_rng(1)
    ids = [f"u{i}" for i in rng.integers(0, users, n)]
    for uid in ids[:500]:  # connection set up, server warm
        lookup.get(uid)
    single: list[float] = []
    for uid in ids:
        t = time.perf_counter()
        v = lookup.get(uid)
        single.append((time.perf_counter() - t) * 1000)
        assert v is not None and v.vector.shape == (DIM,)
    batched: list[float] = []
    for k in range(0, min(n, 200 * many), many):
        t = time.perf_counter()
        got = lookup.get_many(ids[k:k + many])
        batched.append((time.perf_counter() - t) * 1000)
        assert all(g is not None for g in got)
    return {"get": percentiles(single), f"get_many_{many}": percentiles(batched)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--gets", type=int, default=20_000)
    p.add_argument("--redis-url", default=None)
    p.add_argument("--out", type=Path, default=common.RESULTS / "lookup.json")
    a = p.parse_args(argv)
    from clickvec.devtools import redis as redis_dev

    prefix = f"bench{os.getpid()}:"
    with tempfile.TemporaryDirectory(prefix="clickvec-bench-lookup-") as tmp:
        server = None if a.redis_url else redis_dev.start(Path(tmp) / "redis")
        url = a.redis_url or server.url
        try:
            loaded = load(url, a.users, prefix)
            print("loaded:", loaded, flush=True)
            lat = gets(url, a.users, a.gets, prefix)
        finally:
            if server is not None:
                server.stop()
    out = {"benchmark": "lookup", "store": "redis-server 7.0 (Debian package), one client, localhost TCP",
           "vector_dim": DIM, "load": loaded, **lat,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "loadavg_1m": round(os.getloadavg()[0], 2)},
           "note": "client and server share this machine's cores with other jobs"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
