"""Transactional upstream against a plain one: the worker's backlog throughput (issue 14).

An upstream that writes with Kafka transactions leaves commit markers (one offset per
partition per transaction) and, for aborted transactions, records the worker must read
and drop (it reads `read_committed`). The continuity check must not take the markers'
offsets for holes: no read-backs, and throughput within 10 % of a plain upstream.

Same harness as benchmarks/pipeline.py (backlog mode: the load on the topic first, then
`clickvec stream`; events/s from the first to the last output at an independent reader).
The same committed events go to a fresh topic per run, either from the plain idempotent
producer or from a transactional one in transactions of `--txn-size` events, with an
aborted transaction of `--txn-size` other events for these users after every
`--abort-every`-th commit. Runs alternate plain / transactional (`--repeats` each) so the
machine's load drifts over both alike; the medians are compared. Each transactional run
also checks that nothing aborted was applied (outputs == committed events, each user's
last seq == its committed event count) and reads the worker's read-back counter.

    nice -n 10 .venv/bin/python -m benchmarks.transactional [--events N] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/transactional.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common
from benchmarks.common import make_events
from benchmarks.pipeline import backlog_run
from clickvec.devtools.proc import free_port
from clickvec.kafka import produce_waiting
from clickvec.logsetup import configure

log = logging.getLogger("transactional")


def send_transactional(bootstrap: str, topic: str, events: list[tuple[bytes, bytes]], txn_size: int,
                       abort_every: int, seed: int = 7) -> dict[str, int]:
    """`events` in committed transactions of `txn_size`; after every `abort_every`-th, an
    aborted transaction of as many events for the same users (other items, later times):
    applied by mistake, they would add vectors and shift every later seq."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"bench-tx-{uuid.uuid4().hex}",
                  "linger.ms": 5, "compression.type": "lz4", "queue.buffering.max.messages": 1_000_000})
    p.init_transactions(30)
    fakes = make_events(len(events), 1, seed=seed)  # values only; keys come from the real chunk
    committed = aborted = txns = aborts = 0
    for i in range(0, len(events), txn_size):
        chunk = events[i:i + txn_size]
        p.begin_transaction()
        for k, v in chunk:
            produce_waiting(p, topic, k, v, wait=0.01)
        p.commit_transaction(60)
        committed += len(chunk)
        txns += 1
        if txns % abort_every == 0:
            p.begin_transaction()
            for (k, _), (_, fv) in zip(chunk, fakes[i:i + txn_size], strict=False):
                fake = json.loads(fv)
                fake["user_id"] = k.decode()
                fake["item_id"] = "aborted-item"
                produce_waiting(p, topic, k, json.dumps(fake).encode(), wait=0.01)
            # Delivered first: an abort racing its own in-flight produce requests ends the
            # producer with a fatal INVALID_TXN_STATE (seen with Kafka 4.1.1).
            p.flush(60)
            p.abort_transaction(60)
            aborted += len(chunk)
            aborts += 1
    return {"committed_events": committed, "aborted_events": aborted, "transactions": txns,
            "aborted_transactions": aborts}


def _metric(port: int, name: str) -> float | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _check_outputs(reader: Any, events: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """After a few more seconds of reading: outputs beyond the committed events (aborted
    ones applied), and users whose last seq is not their committed event count."""
    end = time.monotonic() + 3
    while time.monotonic() < end:
        reader.poll(0.2)
    per_user = Counter(k.decode() for k, _ in events)
    last: dict[str, int] = {}
    for v in reader.values:
        m = json.loads(v)
        last[m["user_id"]] = max(last.get(m["user_id"], 0), m["seq"])
    wrong = sum(1 for u, n in per_user.items() if last.get(u) != n)
    return {"outputs": len(reader.values), "extra_outputs": len(reader.values) - len(events),
            "users_with_wrong_last_seq": wrong}


def one_run(kind: str, events: list[tuple[bytes, bytes]], ctx: dict[str, Any], cap_s: float,
            txn_size: int, abort_every: int) -> dict[str, Any]:
    port = free_port()
    extra: dict[str, Any] = {}

    def send(topic: str) -> None:
        t0 = time.monotonic()
        if kind == "transactional":
            extra["upstream"] = send_transactional(ctx["bootstrap"], topic, events, txn_size, abort_every)
        elif kind == "plain-chunked":  # the transactional run's batch sizes, without transactions
            s = common.Sender(ctx["bootstrap"], topic, linger_ms=5)
            for i in range(0, len(events), txn_size):
                s.send(events[i:i + txn_size])
        else:
            common.Sender(ctx["bootstrap"], topic, linger_ms=5).send(events)
        extra["load_s"] = round(time.monotonic() - t0, 2)

    def on_done(reader: Any) -> None:
        extra["read_backs"] = _metric(port, "clickvec_events_gap_filled_total")
        n, total = _metric(port, "clickvec_batch_size_count"), _metric(port, "clickvec_batch_size_sum")
        extra["batches"], extra["mean_batch"] = n, (total / n if n and total is not None else None)
        extra["check"] = _check_outputs(reader, events)

    r = backlog_run("clickvec", events, ctx, cap_s, extra=["--web-port", str(port)], send=send, on_done=on_done)
    r.update(kind=kind, **extra)
    log.info("%-13s %8.0f ev/s  %.3f cpu ms/ev  read-backs %s  mean batch %s  check %s", kind, r["events_per_s"],
             r["worker_cpu_ms_per_event"], r["read_backs"], r["mean_batch"], r["check"])
    return r


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=60_000, help="committed events per run (default %(default)s)")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="runs of each kind, alternating (default %(default)s)")
    p.add_argument("--txn-size", type=int, default=100, help="events per transaction (default %(default)s)")
    p.add_argument("--abort-every", type=int, default=5,
                   help="an aborted transaction after every N committed ones (default %(default)s)")
    p.add_argument("--kinds", nargs="+", default=["plain", "transactional"],
                   choices=["plain", "transactional", "plain-chunked"],
                   help="plain-chunked: the plain producer flushed every --txn-size events, so its "
                        "record batches are as small as the transactional ones")
    p.add_argument("--bootstrap", default=None, help="use this broker instead of starting one")
    p.add_argument("--out", type=Path, default=common.RESULTS / "transactional.json")
    a = p.parse_args(argv)
    configure(logging.INFO)
    load_before = list(__import__("os").getloadavg())
    t_begin = time.time()
    with tempfile.TemporaryDirectory(prefix="clickvec-bench-tx-") as tmp:
        work = Path(tmp)
        with common.kafka(work, a.bootstrap) as bootstrap:
            ctx = {"bootstrap": bootstrap, "work": work, "bundle": common.make_bundle(work),
                   "partitions": a.partitions}
            events = make_events(a.events, a.users, seed=1)
            runs = [one_run(kind, events, ctx, 60.0, a.txn_size, a.abort_every)
                    for _ in range(a.repeats) for kind in a.kinds]
    med = {k: statistics.median(r["events_per_s"] for r in runs if r["kind"] == k) for k in a.kinds}
    cpu = {k: statistics.median(r["worker_cpu_ms_per_event"] for r in runs if r["kind"] == k) for k in a.kinds}
    ratio = med["transactional"] / med["plain"]
    tx = [r for r in runs if r["kind"] == "transactional"]
    res = {
        "benchmark": "transactional",
        "what": __doc__.split("\n\n")[1].strip(),
        "load": {"events": a.events, "users": a.users, "partitions": a.partitions, "repeats": a.repeats,
                 "txn_size": a.txn_size, "abort_every": a.abort_every, "kinds": a.kinds},
        "median_events_per_s": med,
        "median_worker_cpu_ms_per_event": cpu,
        "ratio_transactional_to_plain": ratio,
        "within_10pct": abs(ratio - 1) <= 0.10,
        "read_backs_transactional": [r["read_backs"] for r in tx],
        "aborted_applied": [r["check"]["extra_outputs"] for r in tx],
        "users_wrong": [r["check"]["users_with_wrong_last_seq"] for r in tx],
        "runs": runs,
        "versions": common.versions(),
        "machine": {**common.machine_info(), "load_average_before": load_before,
                    "note": "broker, worker, producer and reader share these cores, with other jobs"},
        "wall_s": time.time() - t_begin,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("median_events_per_s", "median_worker_cpu_ms_per_event", "ratio_transactional_to_plain", "within_10pct",
                                          "read_backs_transactional", "aborted_applied", "users_wrong")},
                     indent=1))


if __name__ == "__main__":
    main()
