"""Latency sweep on a real local Kafka broker: the ceiling, the clickvec worker (one or
more settings: "before" / "after") and the naive agent, paced at several rates in one
run, with the model alone and each contender's backlog rate for reference.

Placement (latency_probe.Placement, recorded in the JSON): the contender runs alone on
core 0 (`taskset`); the broker, the paced load generator, the output reader (each its own
process) and this process on core 1. Other users' jobs are not pinned; on a shared machine
`--nice -10` (the default; root) puts every process of the benchmark ahead of them.

Rates: `--rates` (absolute) and `--fractions` of the reference clickvec setting's backlog
rate (the first `--variant`), each measured for the ceiling and every clickvec setting, the
runs of one rate back to back; the naive agent only at rates up to 70 % of its own backlog
rate (above it falls behind and its latency is its queue).

    .venv/bin/python -m benchmarks.latency [--rates 1000 2000] [--fractions 0.25 0.5]
        [--variant before="--max-wait 0.005" --variant after=""] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common
from benchmarks.latency_probe import Placement, pin, prioritize
from benchmarks.pipeline import WARM_S, backlog_run, model_only, paced_run
from clickvec.logsetup import configure

log = logging.getLogger("latency")


def _variants(specs: list[str]) -> dict[str, list[str]]:
    out = {}
    for s in specs:
        name, _, flags = s.partition("=")
        out[name] = shlex.split(flags)
    return out or {"default": []}


def _warmup() -> list[tuple[bytes, bytes]]:
    warm = common.make_events(200, 200, seed=3)
    return [(b"w" + k, v.replace(b'"user_id":"u', b'"user_id":"wu')) for k, v in warm]


def run(a: argparse.Namespace, placement: Placement, work: Path, bootstrap: str, broker_pid: int | None
        ) -> dict[str, Any]:
    bundle = common.make_bundle(work)
    pin(placement.worker)  # the model alone where the worker runs
    mo = model_only(bundle)
    pin(placement.harness)
    ctx = {"bootstrap": bootstrap, "work": work, "bundle": bundle, "partitions": a.partitions,
           "placement": placement, "broker_pid": broker_pid, "linger_ms": a.linger_ms, "nice": a.nice,
           "reader_fetch_wait_ms": a.reader_fetch_wait_ms}
    variants = _variants(a.variant)
    events = common.make_events(a.events, a.users, seed=1)
    backlog: dict[str, Any] = {}
    for name, flags in variants.items():
        backlog[f"clickvec:{name}"] = backlog_run("clickvec", events, ctx, 30.0, a.max_batch, None, flags)
    backlog["ceiling"] = backlog_run("ceiling", events, ctx, 30.0, a.max_batch, a.max_wait)
    if a.naive:
        backlog["naive"] = backlog_run("naive", events[: a.naive_events], ctx, 30.0)
    ref = backlog[f"clickvec:{next(iter(variants))}"]["events_per_s"]
    rates = sorted({round(r) for r in a.rates} | {round(ref * f) for f in a.fractions})
    warm = _warmup()
    # The broker's JVM compiles its hot paths during the first minutes; the first paced run
    # was the slowest in every trial run. A paced ceiling run first, not counted.
    top = max(rates)
    jit = paced_run("ceiling", {"n": int(top * (a.paced_s + WARM_S)) + 1000, "users": a.users, "seed": 9}, warm,
                    top, a.paced_s, ctx, max_batch=a.max_batch, max_wait=a.max_wait)
    sweep: list[dict[str, Any]] = []
    for rate, rnd in [(r, i) for i in range(a.rounds) for r in rates]:
        spec = {"n": int(rate * (a.paced_s + WARM_S)) + 1000, "users": a.users, "seed": 2 + rnd}
        row: dict[str, Any] = {"rate": rate, "round": rnd, "fraction_of_reference_backlog": rate / ref}
        row["ceiling"] = paced_run("ceiling", spec, warm, rate, a.paced_s, ctx, max_batch=a.max_batch,
                                   max_wait=a.max_wait, extra=shlex.split(a.ceiling_flags))
        for name, flags in variants.items():
            row[f"clickvec:{name}"] = paced_run("clickvec", spec, warm, rate, a.paced_s, ctx, max_batch=a.max_batch,
                                                max_wait=None, extra=flags)
        if a.naive and rate <= 0.7 * backlog["naive"]["events_per_s"]:
            row["naive"] = paced_run("naive", spec, warm, rate, a.paced_s, ctx)
        sweep.append(row)
    for rate in a.naive_rates if a.naive else []:  # below the sweep's rates: the naive agent's own
        spec = {"n": int(rate * (a.paced_s + WARM_S)) + 1000, "users": a.users, "seed": 2}
        sweep.append({"rate": rate, "round": 0, "fraction_of_reference_backlog": rate / ref,
                      "ceiling": paced_run("ceiling", spec, warm, rate, a.paced_s, ctx, max_batch=a.max_batch,
                                           max_wait=a.max_wait),
                      "naive": paced_run("naive", spec, warm, rate, a.paced_s, ctx)})
    return {"model_only": mo, "backlog": backlog, "broker_warmup_run": jit, "reference_backlog_events_per_s": ref, "rates": rates,
            "sweep": sweep, "variants": variants}


def table(res: dict[str, Any]) -> str:
    """The sweep as a markdown table (README)."""
    lines = ["| rate ev/s | contender | p50 / p99 / p99.9 / max ms | input acked p99 ms | send->produced p99 ms | "
             "delivered | CPU share worker / broker / loadgen / reader | load avg |",
             "|---:|---|---|---:|---:|---:|---|---:|"]
    for row in res["sweep"]:
        for k, r in row.items():
            if not isinstance(r, dict) or "latency_ms" not in r:
                continue
            q = r["latency_ms"]
            f = " / ".join("-" if q[x] is None else f"{q[x]:.1f}" for x in ("p50", "p99", "p999", "max"))
            sp = r["send_to_output_produced_ms"]["p99"]
            c = r["cpu_share_of_a_core"]
            ack = r.get("send_to_input_acked_ms", {}).get("p99")
            lines.append(f"| {row['rate']:,} | {k} | {f} | {'-' if ack is None else f'{ack:.0f}'} | "
                         f"{'-' if sp is None else f'{sp:.0f}'} | "
                         f"{r['delivered_fraction']:.3f} | {c['worker']:.2f} / {c['broker']:.2f} / "
                         f"{c['load_generator']:.2f} / {c['reader']:.2f} | {r['load_average_at_start'][0]:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=float, nargs="*", default=[1000, 2000])
    p.add_argument("--fractions", type=float, nargs="*", default=[0.25, 0.5],
                   help="of the first clickvec setting's backlog rate")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=FLAGS: a clickvec setting (extra `clickvec stream` flags); repeat; first = reference")
    p.add_argument("--events", type=int, default=60_000, help="backlog events")
    p.add_argument("--naive-events", type=int, default=20_000)
    p.add_argument("--naive-rates", type=float, nargs="*", default=[500],
                   help="extra paced runs of the naive agent (and the ceiling) at these rates")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--paced-s", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=1, help="the whole sweep this many times (rates in turn)")
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--max-wait", type=float, default=0.005)
    p.add_argument("--linger-ms", type=float, default=5, help="the load generator's linger.ms")
    p.add_argument("--reader-fetch-wait-ms", type=int, default=100, help="the output reader's fetch.wait.max.ms")
    p.add_argument("--ceiling-flags", default="", help="extra flags of benchmarks.ceiling (e.g. --fetch-wait-ms 5)")
    p.add_argument("--no-naive", dest="naive", action="store_false")
    p.add_argument("--no-pin", action="store_true", help="no core placement")
    p.add_argument("--nice", type=int, default=-10,
                   help="niceness (task and autogroup) of this process and all it starts (broker, worker, load "
                        "generator, reader); negative: ahead of other users' jobs on a shared machine (root only)")
    p.add_argument("--out", type=Path, default=common.RESULTS / "latency.json")
    a = p.parse_args(argv)
    configure(logging.INFO)
    placement = Placement.default(not a.no_pin)
    pin(placement.harness)  # before the broker starts: it inherits the harness's cores
    prioritize(a.nice)
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    if niceness != a.nice:
        log.warning("could not set niceness %d (not root?); running at %d", a.nice, niceness)
    load_before = list(os.getloadavg())
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="clickvec-latency-") as tmp:
        from clickvec.devtools import broker as broker_mod

        broker = broker_mod.start(Path(tmp) / "kafka", reset=True)
        prioritize(a.nice, broker.pid)  # a session (autogroup) of its own
        try:
            res = run(a, placement, Path(tmp), broker.bootstrap, broker.pid)
        finally:
            broker.stop()
    res = {"benchmark": "latency", "what": __doc__.split("\n\n")[0].strip(), "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "placement": {**placement.describe(), "niceness": niceness}, **res, "versions": common.versions(),
        "machine": {**common.machine_info(), "load_average_before": load_before,
                    "note": "2 cores shared with other agents' jobs (training, benchmarks) during the run"},
        "wall_s": time.time() - t0}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(table(res))


if __name__ == "__main__":
    main()
