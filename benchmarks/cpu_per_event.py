"""Worker CPU per event from a backlog, against the model alone, the consume->produce
ceiling and the naive agent, in interleaved rounds on one broker; optionally a py-spy
profile of the clickvec worker.

Uses benchmarks/pipeline.py's backlog run and model-alone measure unchanged (same worker
command, same load, same CPU accounting: the worker process's user + system CPU seconds
between its first and last output at the reader, divided by the outputs in between).

    .venv/bin/python -m benchmarks.cpu_per_event [--rounds 3] [--contenders clickvec ceiling naive]
        [--profile results/profile_round4_x.txt] [--bootstrap HOST:PORT] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, pipeline
from benchmarks.common import make_events
from clickvec.logsetup import configure

log = logging.getLogger("cpu_per_event")


def _py_spy() -> str:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else "/work/main/.venv/bin/py-spy"


_first_output = threading.Event()


class _SignalReader(common.Reader):
    """The benchmark's reader, telling `_Profiled` when the first outputs arrived."""

    def poll(self, *args: Any, **kwargs: Any) -> Any:
        got = super().poll(*args, **kwargs)
        if got:
            _first_output.set()
        return got


class _Profiled(common.Child):
    """The worker process with py-spy attached `delay` seconds after its first outputs
    (its startup over, it works through the backlog), for `seconds`."""

    delay = 0.5
    seconds = 4.0
    raw: Path | None = None
    thread_cpu: dict[str, float] = {}

    def _threads(self) -> dict[str, float]:
        """CPU seconds so far of each of the process's threads, summed per thread name."""
        out: collections.Counter[str] = collections.Counter()
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                comm, _, rest = (task / "stat").read_text().partition(" (")[2].rpartition(")")
                fields = rest.split()
            except OSError:
                continue
            out[f"{comm} ({task.name})"] += (int(fields[11]) + int(fields[12])) / common.TICKS
        return dict(out)

    def start(self) -> _Profiled:
        super().start()

        def attach() -> None:
            _first_output.wait(300)
            time.sleep(self.delay)
            before = self._threads()
            r = subprocess.run([_py_spy(), "record", "--idle", "--threads", "-r", "100", "-d", str(int(self.seconds)),
                                "--format", "raw", "-o", str(self.raw), "--pid", str(self.pid)],
                               capture_output=True, text=True, check=False)
            after = self._threads()
            type(self).thread_cpu = {k: v - before.get(k, 0.0) for k, v in after.items()}
            if r.returncode:
                log.warning("py-spy: %s", r.stderr.strip()[-500:])

        threading.Thread(target=attach, daemon=True).start()
        return self


# Runs `clickvec.cli` with the `clickvec` packages mapped to another source tree (an
# export of an earlier commit): the editable install's finder reads its MAPPING at import.
_SHIM = """
import os, runpy, sys
import __editable___clickvec_0_1_0_finder as f
old, new = sys.argv.pop(1), sys.argv.pop(1)
sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]  # else `clickvec` itself comes from here
for table in (f.MAPPING, f.NAMESPACES):
    for k, v in list(table.items()):
        table[k] = [p.replace(old, new, 1) for p in v] if isinstance(v, list) else v.replace(old, new, 1)
runpy.run_module("clickvec.cli", run_name="__main__", alter_sys=True)
"""


def _with_trees(before: Path | None, after: Path | None) -> None:
    """Contender "before": the clickvec worker from `before` instead of this checkout;
    "clickvec" from `after` when given (a snapshot: the checkout may change meanwhile)."""
    orig = pipeline.command

    def command(name: str, *args: Any, **kwargs: Any) -> list[str]:
        tree = before if name == "before" else after if name == "clickvec" else None
        if name == "before" and tree is None:
            raise SystemExit("contender 'before' needs --before-tree")
        if tree is None:
            return orig(name, *args, **kwargs)
        cmd = orig("clickvec", *args, **kwargs)
        assert cmd[1:3] == ["-m", "clickvec.cli"]
        return [cmd[0], "-c", _SHIM, str(common.REPO), str(tree.resolve()), *cmd[3:]]

    pipeline.command = command  # type: ignore[assignment]


def summarise(raw: Path, rate: int = 100, top: int = 45) -> str:
    """Seconds of samples per thread, then inclusive and self seconds per function for
    the main thread (the event loop), from py-spy's collapsed stacks."""
    threads: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    idle = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        frames = stack.split(";")
        threads[frames[0]] += count
        if "MainThread" not in frames[0]:
            continue
        names = [f.split(" (")[0] for f in frames[1:]]
        if names and names[-1] in ("select", "poll", "epoll_wait") or any("select (selectors" in f for f in frames):
            idle += count
            continue
        for name in set(names):
            incl[name] += count
        if names:
            self_[names[-1]] += count
    out = ["threads (seconds of samples; busy or idle):"]
    out += [f"  {c / rate:7.2f}s {t}" for t, c in threads.most_common()]
    out.append(f"  {idle / rate:7.2f}s   main thread idle (select)")
    out.append("main thread, inclusive:")
    out += [f"  {c / rate:7.2f}s {f}" for f, c in incl.most_common(top)]
    out.append("main thread, self:")
    out += [f"  {c / rate:7.2f}s {f}" for f, c in self_.most_common(top // 2)]
    return "\n".join(out) + "\n"


def model_cpu(bundle: Path, batch: int = 128, seconds: float = 2.0) -> dict[str, Any]:
    """pipeline.model_only's step (one thread, `batch` users a call, one event each), its
    cost in CPU seconds of the calling thread per step: on a machine other jobs load,
    steadier than steps per wall second, and the same unit as the worker's figure."""
    import numpy as np

    from clickvec.bundle.reader import load_bundle

    b = load_bundle(bundle, providers="cpu", intra_op_threads=1)
    rng = np.random.default_rng(0)
    items = rng.integers(1, b.manifest["dims"]["n_items"], size=(1, batch)).astype(np.int64)
    ones = np.ones((1, batch), np.int64)
    lengths = np.ones(batch, np.int32)
    h = np.zeros((b.layers, batch, b.hidden), np.float32)
    c = np.zeros_like(h)
    b.step(items, ones, ones, lengths, h, c)
    n, t0, c0 = 0, time.perf_counter(), time.thread_time()
    while time.perf_counter() - t0 < seconds:
        b.step(items, ones, ones, lengths, h, c)
        n += 1
    cpu = time.thread_time() - c0
    return {"batch": batch, "calls": n, "cpu_ms_per_step": 1e3 * cpu / (n * batch),
            "user_steps_per_s": n * batch / (time.perf_counter() - t0)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--contenders", nargs="+", default=["clickvec", "ceiling", "naive"], choices=(*pipeline.CONTENDERS, "before"))
    p.add_argument("--before-tree", type=Path, default=None, help="source tree of contender 'before'")
    p.add_argument("--tree", type=Path, default=None, help="source tree of contender 'clickvec' (default: here)")
    p.add_argument("--cap-s", type=float, default=40.0, help="time cap per backlog run (the naive agent)")
    p.add_argument("--bootstrap", default=None)
    p.add_argument("--profile", type=Path, default=None, help="py-spy the clickvec worker of one extra run")
    p.add_argument("--profile-contender", default="clickvec", choices=("clickvec", "before"))
    p.add_argument("--profile-delay", type=float, default=0.5, help="seconds after the first outputs")
    p.add_argument("--label", default="")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    configure(logging.INFO)
    _with_trees(a.before_tree, a.tree)
    loads = [list(os.getloadavg())]
    t_begin = time.time()
    with tempfile.TemporaryDirectory(prefix="clickvec-cpu-") as tmp:
        work = Path(tmp)
        with common.kafka(work, a.bootstrap) as bootstrap:
            bundle = common.make_bundle(work)
            model = pipeline.model_only(bundle)
            mcpu = [model_cpu(bundle)]
            events = make_events(a.events, a.users, seed=1)
            ctx = {"bootstrap": bootstrap, "work": work, "bundle": bundle, "partitions": a.partitions}
            runs: dict[str, list[dict[str, Any]]] = {n: [] for n in a.contenders}
            for _ in range(a.rounds):
                for name in a.contenders:
                    runs[name].append(pipeline.backlog_run(name, events, ctx, a.cap_s))
                    loads.append(list(os.getloadavg()))
            model_after = pipeline.model_only(bundle)
            mcpu.append(model_cpu(bundle))
            profile = None
            if a.profile:
                _Profiled.delay = a.profile_delay
                _Profiled.raw = work / "profile.raw"
                real_child, real_reader = pipeline.Child, pipeline.Reader
                pipeline.Child, pipeline.Reader = _Profiled, _SignalReader  # type: ignore[misc]
                try:
                    profile = pipeline.backlog_run(a.profile_contender, events, ctx, a.cap_s)
                finally:
                    pipeline.Child, pipeline.Reader = real_child, real_reader  # type: ignore[misc]
                deadline = time.time() + _Profiled.delay + _Profiled.seconds + 10
                while not _Profiled.raw.exists() and time.time() < deadline:
                    time.sleep(0.5)
                head = (f"py-spy record --idle --threads -r 100 -d {_Profiled.seconds:.0f} on the clickvec worker, "
                        f"{_Profiled.delay:.1f} s after its first outputs, backlog of {a.events} events ({a.users} users, "
                        f"{a.partitions} partitions), default-size model; {a.label}\n"
                        f"that run: {profile['events_per_s']:.0f} events/s, "
                        f"{profile['worker_cpu_ms_per_event']:.4f} worker CPU ms/event (profiler attached), "
                        f"load average {os.getloadavg()}\n\n")
                cpu = sorted(_Profiled.thread_cpu.items(), key=lambda kv: -kv[1])
                head += (f"CPU seconds per thread name (from /proc) during the {_Profiled.seconds:.0f} s sampled, "
                         f"{sum(v for _, v in cpu):.2f} s in all:\n"
                         + "".join(f"  {v:7.2f}s {k}\n" for k, v in cpu if v > 0) + "\n")
                a.profile.write_text(head + summarise(_Profiled.raw))
                import shutil

                shutil.copy(_Profiled.raw, Path("/tmp") / (a.profile.stem + ".raw"))
    model_ms = 1e3 / ((model["user_steps_per_s"] + model_after["user_steps_per_s"]) / 2)
    model_cpu_ms = min(m["cpu_ms_per_step"] for m in mcpu)
    summary = {}
    for name, rs in runs.items():
        if not rs:
            continue
        ms = sorted(r["worker_cpu_ms_per_event"] for r in rs)
        eps = sorted(r["events_per_s"] for r in rs)
        summary[name] = {"cpu_ms_per_event_median": ms[len(ms) // 2], "cpu_ms_per_event_all": ms,
                         "events_per_s_median": eps[len(eps) // 2], "events_per_s_all": eps}
    for name in ("clickvec", "before"):
        if name in summary:
            summary[name]["over_model_alone"] = summary[name]["cpu_ms_per_event_median"] / model_ms
            summary[name]["over_model_alone_cpu"] = summary[name]["cpu_ms_per_event_median"] / model_cpu_ms
    res = {"benchmark": "cpu_per_event", "label": a.label,
           "load": {"events": a.events, "users": a.users, "partitions": a.partitions, "rounds": a.rounds,
                    "cap_s": a.cap_s},
           "model_alone": {"before": model, "after": model_after, "ms_per_event": model_ms,
                           "cpu": mcpu, "cpu_ms_per_event": model_cpu_ms},
           "summary": summary, "runs": runs, "profile_run": profile,
           "versions": common.versions(),
           "machine": {**common.machine_info(), "load_averages": loads,
                       "note": "broker, worker, producer and reader share these cores; other jobs run too"},
           "wall_s": time.time() - t_begin}
    print(json.dumps({"model_ms_per_event": model_ms, "model_cpu_ms_per_event": model_cpu_ms, **summary, "loads": loads}, indent=1))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
