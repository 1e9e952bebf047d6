"""The paced load generator and the output reader of the latency runs, each in a process
of its own (not the benchmark's main process, and not one another's), so that neither
takes the GIL from the other or from the benchmark's bookkeeping while it timestamps.

`pin(cpus)` places the calling process (and what it starts afterwards); pipeline.py puts
the broker, these two processes and itself on one core and the worker on the other
(`Placement`), and records the placement with the results.

Both are driven over a `multiprocessing` pipe (spawned, not forked: the parent holds
librdkafka threads):
  load generator: ("send", records-spec) -> sent (backlog or paced); replies with
                  {source: send time} for the events it was asked to time
  reader:         ("count",) -> outputs so far; ("clear",); ("stop",) -> arrivals

Arrival times are taken when `poll` returns (a blocking wait inside librdkafka, not a
spin), with the reader's fetch wait at 5 ms; send times when the event is handed to the
producer. Both come from `time.time()` of the same machine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from benchmarks import common


@dataclass(frozen=True)
class Placement:
    """Which cores run what; `worker` None: no pinning (a one-core machine)."""

    worker: tuple[int, ...] | None
    harness: tuple[int, ...] | None  # the broker, the load generator, the reader, the benchmark

    @classmethod
    def default(cls, enabled: bool = True) -> Placement:
        cores = sorted(os.sched_getaffinity(0))
        if not enabled or len(cores) < 2:
            return cls(None, None)
        return cls((cores[0],), tuple(cores[1:]))

    def worker_prefix(self) -> list[str]:
        return [] if self.worker is None else ["taskset", "-c", ",".join(map(str, self.worker))]

    def describe(self) -> dict[str, Any]:
        if self.worker is None:
            return {"pinned": False, "note": "no pinning: everything shares every core"}
        return {"pinned": True, "worker_cores": list(self.worker), "harness_cores": list(self.harness or ()),
                "note": "the contender (worker) alone on its core; the broker, the load generator, the "
                        "reader and the benchmark's main process on the other(s). Other users' jobs are "
                        "not pinned and may run on any core."}


def pin(cpus: tuple[int, ...] | None, pid: int = 0) -> None:
    """Every thread of `pid` (0: this process) onto `cpus`; threads started later inherit."""
    if cpus is None:
        return
    tasks = [pid] if pid == 0 else [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    for t in tasks:
        try:
            os.sched_setaffinity(t, set(cpus))
        except (ProcessLookupError, PermissionError):
            pass


def prioritize(nice: int | None, pid: int = 0) -> None:
    """Niceness `nice` for every thread of `pid` (0: this process) and for its autogroup.

    With autogroups on (Linux's default for desktops and this machine), CPU is shared
    first between sessions, and a task's own niceness only orders it within its session:
    every child that starts its own session (the broker, the worker) needs its group's
    niceness set too (/proc/PID/autogroup). Root only for a negative value."""
    if nice is None:
        return
    pid = pid or os.getpid()
    try:
        tasks = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        for t in tasks:
            os.setpriority(os.PRIO_PROCESS, t, nice)
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(str(nice))
    except (OSError, PermissionError):
        pass


# ------------------------------------------------------------------ load generator


def _load_main(conn: Any, bootstrap: str, topic: str, linger_ms: float, cpus: tuple[int, ...] | None) -> None:
    pin(cpus)
    sender = common.Sender(bootstrap, topic, linger_ms=linger_ms)
    conn.send(("ready", os.getpid()))
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        _, spec, rate, duration, time_from = msg
        records = common.make_events(**spec) if isinstance(spec, dict) else spec
        sender.sent_at.clear()
        sender.acked_at.clear()
        n, secs = sender.send(records, rate, duration)
        # Only events sent after `time_from` seconds are timed (the warm-up at full rate is not).
        cut = sender.t_start + time_from
        timed = {s: t for s, t in sender.sent_at.items() if t >= cut}
        acked = common.percentiles([(sender.acked_at[s] - t) * 1e3 for s, t in timed.items()])
        conn.send(("sent", n, secs, timed, cut, acked))


# ------------------------------------------------------------------ reader


def _reader_main(conn: Any, bootstrap: str, topic: str, cpus: tuple[int, ...] | None, fetch_wait_ms: int) -> None:
    pin(cpus)
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-reader-{uuid.uuid4().hex}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False,
                  "fetch.wait.max.ms": fetch_wait_ms, "fetch.min.bytes": 1})
    c.subscribe([topic])
    values: list[bytes] = []
    arrived: list[float] = []
    produced: list[float] = []  # the output's own timestamp (its producer's CreateTime, ms)
    conn.send(("ready", os.getpid()))
    while True:
        if conn.poll(0):
            cmd = conn.recv()[0]
            if cmd == "count":
                conn.send(len(values))
            elif cmd == "clear":
                values.clear()
                arrived.clear()
                produced.clear()
                conn.send(0)
            elif cmd == "stop":
                c.close()
                conn.send(([common.source_of(v) for v in values], arrived, produced))
                return
        first = c.poll(0.01)
        if first is None:
            continue
        now = time.time()
        for m in (first, *c.consume(num_messages=20_000, timeout=0)):
            if m.error() is not None:
                continue
            values.append(m.value())
            arrived.append(now)
            produced.append(m.timestamp()[1] / 1e3)


# ------------------------------------------------------------------ the parent's handles


class _Proc:
    def __init__(self, target: Any, *args: Any) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        if not self.conn.poll(120):
            raise RuntimeError(f"{target.__name__} did not start")
        self.pid = self.conn.recv()[1]

    def call(self, *msg: Any, timeout: float = 600) -> Any:
        self.conn.send(msg)
        if not self.conn.poll(timeout):
            raise RuntimeError(f"no answer to {msg[0]} in {timeout:.0f} s")
        return self.conn.recv()

    def cpu_s(self) -> float:
        return common.cpu_s_of(self.pid)

    def close(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(10)


class LoadGen(_Proc):
    def __init__(self, bootstrap: str, topic: str, linger_ms: float, cpus: tuple[int, ...] | None) -> None:
        super().__init__(_load_main, bootstrap, topic, linger_ms, cpus)

    def send(self, spec: dict[str, Any] | list[tuple[bytes, bytes]], rate: float | None = None,
             duration: float | None = None, time_from: float = 0.0
             ) -> tuple[int, float, dict[str, float], float, dict[str, Any]]:
        """Send the events (`make_events` kwargs or a list); returns (sent, seconds,
        {source: send time} of those sent from `time_from` s on, that cut as a time,
        percentiles of their send -> broker acknowledgement in ms)."""
        _, n, secs, sent_at, cut, acked = self.call("send", spec, rate, duration, time_from)
        return n, secs, sent_at, cut, acked

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(("stop",))
        super().close()


class OutReader(_Proc):
    def __init__(self, bootstrap: str, topic: str, cpus: tuple[int, ...] | None, fetch_wait_ms: int = 100) -> None:
        super().__init__(_reader_main, bootstrap, topic, cpus, fetch_wait_ms)

    def count(self) -> int:
        return int(self.call("count"))

    def clear(self) -> None:
        self.call("clear")

    def stop(self) -> tuple[list[str], list[float], list[float]]:
        out = self.call("stop")
        self.proc.join(10)
        return out
