"""End-to-end pipeline benchmark on a real local Kafka 4.1.1 broker.

Contenders, each fed the same event load on a fresh topic and read back by an
independent consumer:
  (a) clickvec   the `clickvec stream` worker (micro-batches, one ORT call per batch,
                 RocksDB state table, confluent-kafka sink)
  (b) ceiling    a confluent-kafka consume/produce loop, one small message per event,
                 no model, no state (benchmarks/ceiling.py)
  (c) naive      a Faust agent, one ORT call + one table write per event
                 (benchmarks/naive_agent.py --mode naive)
  (d) recompute  a Faust agent re-encoding each user's whole in-memory history on every
                 event (benchmarks/recompute.py)

Throughput: backlog mode (the whole load is on the topic before the worker starts);
sustained events/s = outputs after the first poll / time from first to last output
at the reader. Latency: paced mode at half of (a)'s backlog rate; per event, its send
time at the producer to its output's arrival at the reader. CPU seconds (between
first and last output) and peak RSS of the worker process come from /proc.

Placement (latency_probe.py): the paced load generator and the reader are processes of
their own; the contender runs alone on core 0, the broker, the load generator, the
reader and this process on core 1 (`--no-pin`: everything on every core). Other users'
jobs on the machine are not pinned.

    .venv/bin/python -m benchmarks.pipeline [--events N] [--users U] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/pipeline.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks import common
from benchmarks.common import Child, Reader, Sender, create_topic, make_events, percentiles
from benchmarks.latency_probe import LoadGen, OutReader, Placement, pin, prioritize
from clickvec.devtools.proc import free_port
from clickvec.logsetup import configure

log = logging.getLogger("pipeline")
CONTENDERS = ("clickvec", "ceiling", "naive", "recompute")
WARM_S = 3.0  # seconds at the full paced rate before latency is counted


def command(name: str, bundle: Path, bootstrap: str, in_topic: str, out_topic: str, state_dir: Path,
            max_batch: int, max_wait: float | None, extra: list[str] | None = None) -> list[str]:
    """`max_wait` None: the worker's own default."""
    group = f"bench-{name}-{uuid.uuid4().hex[:8]}"
    py = common.python()
    if name == "clickvec":
        wait = [] if max_wait is None else ["--max-wait", str(max_wait)]
        return [py, "-m", "clickvec.cli", "stream", "--model", str(bundle), "--brokers", bootstrap,
                "--in", in_topic, "--out", out_topic, "--dlq", f"{in_topic}-dlq", "--group", group,
                "--state-dir", str(state_dir), "--web-port", str(free_port()),
                "--max-batch", str(max_batch), *wait, "--loglevel", "warning", *(extra or [])]
    if name == "ceiling":
        return [py, "-m", "benchmarks.ceiling", "--brokers", bootstrap, "--in", in_topic, "--out", out_topic,
                "--group", group, "--max-batch", str(max_batch), "--max-wait", str(max_wait), *(extra or [])]
    mode = "naive" if name == "naive" else "recompute"
    return [py, "-m", "benchmarks.naive_agent", "--mode", mode, "--model", str(bundle), "--brokers", bootstrap,
            "--in", in_topic, "--out", out_topic, "--group", group, "--state-dir", str(state_dir),
            "--web-port", str(free_port())]


def _topics(bootstrap: str, partitions: int) -> tuple[str, str]:
    return create_topic(bootstrap, "bench-in", partitions), create_topic(bootstrap, "bench-out", partitions)


def backlog_run(name: str, events: list[tuple[bytes, bytes]], ctx: dict[str, Any], cap_s: float,
                max_batch: int = 1024, max_wait: float | None = 0.005, extra: list[str] | None = None,
                send: Any = None, on_done: Any = None) -> dict[str, Any]:
    """The whole load on the topic first, then the worker: sustained events/s. `send(topic)`
    writes the load instead of a plain producer (benchmarks/transactional.py); `on_done(r)`
    is called while the worker still runs (e.g. to read its metrics)."""
    bootstrap, work = ctx["bootstrap"], ctx["work"]
    in_topic, out_topic = _topics(bootstrap, ctx["partitions"])
    if send is None:
        Sender(bootstrap, in_topic, linger_ms=5).send(events)
    else:
        send(in_topic)
    reader = Reader(bootstrap, out_topic)
    placement: Placement = ctx.get("placement") or Placement(None, None)
    child = Child(placement.worker_prefix() + command(
        name, ctx["bundle"], bootstrap, in_topic, out_topic, work / f"state-{uuid.uuid4().hex[:6]}", max_batch,
        max_wait, extra), work / f"{name}-backlog.log").start()
    prioritize(ctx.get("nice"), child.pid)
    n_total = len(events)
    t_start = time.time()
    t_first = cpu_first = None
    n_first = 0
    t_last_progress = time.time()
    try:
        while True:
            got = reader.poll(0.05)
            now = time.time()
            if got:
                t_last_progress = now
                if t_first is None:
                    t_first, cpu_first, n_first = now, child.cpu_s(), got
            n = len(reader.values)
            if n >= n_total:
                break
            if t_first is not None and now - t_first > cap_s:
                break
            if t_first is None and now - t_start > 120:
                raise RuntimeError(f"{name}: no output within 120 s\n{child.log_tail()}")
            if t_first is not None and now - t_last_progress > 30:
                raise RuntimeError(f"{name}: no progress for 30 s at {n} outputs\n{child.log_tail()}")
            if not child.alive():
                raise RuntimeError(f"{name}: worker exited\n{child.log_tail()}")
        cpu_last = child.cpu_s()
        rss = child.peak_rss_mb()
        if on_done is not None:
            on_done(reader)
    finally:
        child.stop()
        reader.close()
    t_last = reader.arrived[-1]
    n_out = len(reader.values)
    span = t_last - t_first
    rate = (n_out - n_first) / span if span > 0 else float("nan")
    cpu = cpu_last - cpu_first
    r = {"events": n_total, "outputs": n_out, "complete": n_out >= n_total, "span_s": span,
         "events_per_s": rate, "worker_cpu_s": cpu, "worker_cpu_ms_per_event": 1e3 * cpu / max(1, n_out - n_first),
         "worker_peak_rss_mb": rss, "startup_to_first_output_s": t_first - t_start,
         "max_batch": max_batch, "max_wait": max_wait}
    log.info("%-9s backlog: %8.0f ev/s  (%d/%d outputs in %.1f s, cpu %.2f ms/ev, rss %.0f MB)", name, rate,
             n_out, n_total, span, r["worker_cpu_ms_per_event"], rss)
    return r


def paced_run(name: str, events: list[tuple[bytes, bytes]] | dict[str, Any],
              warmup: list[tuple[bytes, bytes]], rate: float, duration: float, ctx: dict[str, Any],
              drain_s: float = 15.0, max_batch: int = 1024, max_wait: float | None = 0.005,
              extra: list[str] | None = None, warm_s: float = WARM_S) -> dict[str, Any]:
    """The worker running and warmed up first, then events at `rate`/s for `warm_s` +
    `duration` s; latency counts the events sent in the last `duration` s (the first
    `warm_s` s at full rate let the worker reach its steady state: its first batches at a
    new rate are slower, as the RocksDB reads of users not seen yet are).

    The load generator and the reader are processes of their own (latency_probe.py), on
    the harness's cores when `ctx["placement"]` pins (the worker then runs alone on its
    core). `events`: a list, or `make_events` keyword arguments (generated by the load
    generator itself)."""
    bootstrap, work = ctx["bootstrap"], ctx["work"]
    placement: Placement = ctx.get("placement") or Placement(None, None)
    in_topic, out_topic = _topics(bootstrap, ctx["partitions"])
    reader = OutReader(bootstrap, out_topic, placement.harness, ctx.get("reader_fetch_wait_ms", 100))
    # linger.ms 5: the default of librdkafka and of Kafka's Java producer (4.x). With 0,
    # every event went out as its own produce request and the broker, on the same two
    # cores, spent twice the CPU on them.
    gen = LoadGen(bootstrap, in_topic, ctx.get("linger_ms", 5), placement.harness)
    child = Child(placement.worker_prefix() + command(
        name, ctx["bundle"], bootstrap, in_topic, out_topic, work / f"state-{uuid.uuid4().hex[:6]}", max_batch,
        max_wait, extra), work / f"{name}-paced.log").start()
    prioritize(ctx.get("nice"), child.pid)
    pids = {"worker": lambda: child.cpu_s(), "load_generator": gen.cpu_s, "reader": reader.cpu_s,
            "broker": (lambda: common.cpu_s_of(ctx["broker_pid"])) if ctx.get("broker_pid") else (lambda: 0.0)}
    try:
        gen.send(warmup)
        deadline = time.time() + 120
        while reader.count() < len(warmup):
            time.sleep(0.05)
            if time.time() > deadline or not child.alive():
                raise RuntimeError(f"{name}: warm-up outputs missing\n{child.log_tail()}")
        reader.clear()
        # CPU seconds of every process over the whole paced send (warm + measured).
        cpu0 = {k: f() for k, f in pids.items()}
        load0 = os.getloadavg()
        n_all, send_s, sent_at, cut, acked = gen.send(events, rate, warm_s + duration, time_from=warm_s)
        cpu = {k: f() - cpu0[k] for k, f in pids.items()}
        deadline = time.time() + drain_s
        while reader.count() < n_all and time.time() < deadline:
            time.sleep(0.05)
        rss = child.peak_rss_mb()
        sources, arrived, produced = reader.stop()
    finally:
        child.stop()
        gen.close()
        reader.close()
    lat, to_out, when = [], [], []
    for src, t, tp in zip(sources, arrived, produced, strict=True):
        s = sent_at.get(src)
        if s is not None:
            lat.append((t - s) * 1e3)
            to_out.append((tp - s) * 1e3)
            when.append(s - cut)
    n_sent = len(sent_at)
    pct = percentiles(lat)
    r = {"rate_target": rate, "warm_s": warm_s, "measured_s": duration, "sent": n_sent,
         "rate_achieved": n_all / send_s, "delivered": len(lat), "delivered_fraction": len(lat) / max(1, n_sent),
         "latency_ms": pct,
         # send -> the output's producer timestamp (ms resolution): everything up to the
         # contender handing the output to its producer; the rest is its producer, the
         # broker and the reader's fetch.
         "send_to_output_produced_ms": percentiles(to_out),
         # send -> the broker's acknowledgement at the load generator (linger.ms, the broker's
         # append; taken at the generator's next poll, about 1 ms apart).
         "send_to_input_acked_ms": acked,
         "per_second": _per_second(when, lat),
         "cpu_s": cpu, "cpu_share_of_a_core": {k: v / send_s for k, v in cpu.items()},
         "load_average_at_start": list(load0),
         "worker_cpu_s": cpu["worker"], "worker_cpu_ms_per_event": 1e3 * cpu["worker"] / max(1, n_all),
         "worker_peak_rss_mb": rss, "placement": placement.describe(),
         "note": None if len(lat) >= n_sent else
         f"fell behind: {n_sent - len(lat)} outputs not arrived {drain_s:.0f} s after the last send; "
         "percentiles cover the delivered ones only (a lower bound)"}
    log.info("%-9s paced %.0f ev/s: p50 %s  p99 %s  p99.9 %s ms  (%d/%d delivered; cpu %s; load %.1f)", name, rate,
             _f(pct["p50"]), _f(pct["p99"]), _f(pct["p999"]), len(lat), n_sent,
             " ".join(f"{k} {v:.2f}" for k, v in r["cpu_share_of_a_core"].items()), load0[0])
    return r


def _per_second(when: list[float], lat: list[float]) -> list[list[float]]:
    """[second since the measured window began, p50, p99 ms] of the events sent in it."""
    if not lat:
        return []
    sec = np.floor(np.asarray(when)).astype(int)
    a = np.asarray(lat)
    return [[int(s), round(float(np.quantile(a[sec == s], 0.5)), 1), round(float(np.quantile(a[sec == s], 0.99)), 1)]
            for s in np.unique(sec)]


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in CONTENDERS if n in result["contenders"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    rates = [result["contenders"][n]["backlog"]["events_per_s"] for n in names]
    a1.bar(names, rates, color=["C0", "C7", "C3", "C1"][: len(names)])
    a1.set_yscale("log")
    a1.set_ylabel("sustained events/s (backlog)")
    for i, r in enumerate(rates):
        a1.text(i, r, f"{r:,.0f}", ha="center", va="bottom", fontsize=8)
    mo = result["model"].get("model_only")
    if mo:
        a1.axhline(mo["user_steps_per_s"], color="k", ls="--", lw=0.8)
        a1.text(len(names) - 0.5, mo["user_steps_per_s"], "model alone (ORT step)", ha="right", va="bottom",
                fontsize=7)
    x = np.arange(len(names))
    for j, (q, lab) in enumerate((("p50", "p50"), ("p99", "p99"), ("p999", "p99.9"))):
        vals = [(result["contenders"][n].get("paced") or {}).get("latency_ms", {}).get(q) or 0 for n in names]
        a2.bar(x + (j - 1) * 0.27, vals, 0.27, label=lab)
    a2.set_xticks(x, names)
    a2.set_yscale("log")
    a2.set_ylabel("end-to-end latency, ms")
    a2.set_title(f"paced at {result['paced_rate']:,.0f} ev/s (half of clickvec's max)", fontsize=9)
    a2.legend(fontsize=8)
    fig.suptitle(f"clickvec pipeline, {result['machine']['cores']} cores shared by broker + worker "
                 f"(load {result['machine']['load_average'][0]:.1f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=None, help="backlog events per contender (default 100k, quick 30k)")
    p.add_argument("--users", type=int, default=None, help="distinct users (default 2000, quick 1000)")
    p.add_argument("--quick", action="store_true", help="smaller loads and shorter runs (under ~3 min)")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=1024, help="clickvec and ceiling batch size")
    p.add_argument("--max-wait", type=float, default=0.005)
    p.add_argument("--latency-fractions", type=float, nargs="*", default=[0.25],
                   help="extra paced runs (clickvec and ceiling) at these fractions of clickvec's backlog rate")
    p.add_argument("--bootstrap", default=None, help="use this broker instead of starting one")
    p.add_argument("--out", type=Path, default=common.RESULTS / ("pipeline.json"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--nice", type=int, default=None,
                   help="niceness (task and autogroup) of the benchmark and all it starts; e.g. -10 on a "
                        "shared machine (root only; benchmarks/latency.py uses -10)")
    p.add_argument("--no-pin", action="store_true",
                   help="no core placement (default: worker alone on core 0, broker + load generator + reader on 1)")
    a = p.parse_args(argv)
    configure(logging.INFO)
    placement = Placement.default(not a.no_pin)
    pin(placement.harness)  # before the broker starts: it inherits the harness's cores
    prioritize(a.nice)
    n_events = a.events or (30_000 if a.quick else 100_000)
    n_users = a.users or (1000 if a.quick else 2000)
    cap_s = 15.0 if a.quick else 40.0  # time cap per backlog run (slow contenders)
    paced_s = 6.0 if a.quick else 20.0
    load_before = list(os.getloadavg())
    t_begin = time.time()

    with tempfile.TemporaryDirectory(prefix="clickvec-bench-") as tmp:
        work = Path(tmp)
        broker_pid: list[int] = []

        def started(b: Any) -> None:  # a fresh broker per run, in a session (autogroup) of its own
            prioritize(a.nice, b.pid)
            broker_pid.append(b.pid)

        with common.kafka(work, a.bootstrap, on_start=started) as bootstrap:
            bundle = common.make_bundle(work)
            pin(placement.worker)  # the model alone where the worker runs
            from clickvec.bundle.reader import load_bundle

            b = load_bundle(bundle, providers="cpu")
            dims = b.manifest["dims"]
            model = {"dims": dims, "model_id": b.model_id,
                     "params": json.loads((work / "model.json").read_text())["params"],
                     "weights": "random (cost does not depend on them)"}
            model["model_only"] = model_only(bundle)
            pin(placement.harness)
            del b
            events = make_events(n_events, n_users, seed=1)
            ctx = {"bootstrap": bootstrap, "work": work, "bundle": bundle, "partitions": a.partitions,
                   "placement": placement, "broker_pid": broker_pid[0] if broker_pid else None,
                   "nice": a.nice}
            contenders: dict[str, dict[str, Any]] = {}
            for name in a.contenders:
                contenders[name] = {"backlog": backlog_run(name, events, ctx, cap_s, a.max_batch, a.max_wait)}
            ref = contenders.get("clickvec", contenders[a.contenders[0]])["backlog"]["events_per_s"]
            paced_rate = round(ref / 2)
            paced_events = make_events(int(paced_rate * (paced_s + WARM_S)) + 1000, n_users, seed=2)
            warm = make_events(200, 200, seed=3)
            warm = [(b"w" + k, v.replace(b'"user_id":"u', b'"user_id":"wu')) for k, v in warm]
            for name in a.contenders:
                contenders[name]["paced"] = paced_run(name, paced_events, warm, paced_rate, paced_s, ctx,
                                                      max_batch=a.max_batch, max_wait=a.max_wait)
            # Latency at lower fractions of clickvec's backlog rate, for clickvec and the ceiling.
            for frac in a.latency_fractions:
                rate = round(ref * frac)
                for name in [n for n in a.contenders if n in ("clickvec", "ceiling")]:
                    r = paced_run(name, paced_events, warm, rate, paced_s, ctx, max_batch=a.max_batch,
                                  max_wait=a.max_wait)
                    contenders[name].setdefault("paced_fractions", []).append({"fraction": frac, **r})

    res = {
        "benchmark": "pipeline",
        "what": __doc__.split("\n\n")[1].strip(),
        "load": {"events": n_events, "users": n_users, "partitions": a.partitions,
                 "backlog_cap_s": cap_s, "paced_s": paced_s, "quick": a.quick},
        "model": model,
        "paced_rate": paced_rate,
        "contenders": contenders,
        "ratios": _ratios(contenders),
        "versions": common.versions(),
        "placement": {**placement.describe(), "niceness": os.getpriority(os.PRIO_PROCESS, 0)},
        "machine": {**common.machine_info(), "load_average_before": load_before,
                    "note": "broker, worker, load generator and reader share these cores (see placement)"},
        "wall_s": time.time() - t_begin,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    if not a.no_plot:
        plot(res, a.out.with_suffix(".png"))
    print(json.dumps({"ratios": res["ratios"], "paced_rate": paced_rate,
                      **{n: {"ev_s": round(c["backlog"]["events_per_s"]),
                             "lat_ms": c.get("paced", {}).get("latency_ms")} for n, c in contenders.items()}},
                     indent=1))


def model_only(bundle: Path, batch: int = 128, seconds: float = 2.0) -> dict[str, Any]:
    """The step graph alone, as the worker calls it (one thread, `batch` users a call, one
    new event each): an upper bound on any worker running this model on this machine."""
    from clickvec.bundle.reader import load_bundle

    b = load_bundle(bundle, providers="cpu", intra_op_threads=1)
    rng = np.random.default_rng(0)
    dims = b.manifest["dims"]
    items = rng.integers(1, dims["n_items"], size=(1, batch)).astype(np.int64)
    etypes = np.ones((1, batch), np.int64)
    gaps = np.ones((1, batch), np.int64)
    lengths = np.ones(batch, np.int32)
    h = np.zeros((b.layers, batch, b.hidden), np.float32)
    c = np.zeros_like(h)
    b.step(items, etypes, gaps, lengths, h, c)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b.step(items, etypes, gaps, lengths, h, c)
        n += 1
    dt = time.perf_counter() - t0
    return {"batch": batch, "intra_op_threads": 1, "calls": n, "user_steps_per_s": n * batch / dt,
            "note": "ONNX Runtime step alone, no Kafka, no state, no parsing"}


def _ratios(c: dict[str, dict[str, Any]]) -> dict[str, float]:
    r: dict[str, float] = {}
    if "clickvec" not in c:
        return r
    a = c["clickvec"]["backlog"]["events_per_s"]
    for other in ("ceiling", "naive", "recompute"):
        if other in c:
            r[f"clickvec_over_{other}"] = a / c[other]["backlog"]["events_per_s"]
    return r


if __name__ == "__main__":
    main()
