"""Shared pieces of the pipeline benchmarks: a default-size bundle, a synthetic event
load, child processes with CPU / RSS accounting from /proc, a paced or backlog
producer that remembers when each event was sent, and an independent output reader.

Every contender's output message carries `source` = "topic[partition]@offset" of the
input event (the contract's VectorMessage does; the ceiling writes it too), so the
reader matches each output to the send time of its event.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from clickvec.devtools.proc import ChildProcess
from clickvec.kafka import produce_waiting

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
TICKS = os.sysconf("SC_CLK_TCK")

# Default-size model: the encoder's defaults (item_dim 64, hidden 128, z_dim 32).
N_ITEMS = 2000


def make_bundle(root: Path, n_items: int = N_ITEMS, seed: int = 0) -> Path:
    """A randomly initialised default-size encoder exported to `root/bundle` (weights do
    not change the cost)."""
    import torch

    from clickvec.export.writer import export_bundle
    from clickvec.features import FeatureSpec
    from clickvec.training.checkpoint import save_checkpoint
    from clickvec.training.model import Encoder, ModelConfig

    spec = FeatureSpec(items=tuple(f"item-{i}" for i in range(n_items)))
    torch.manual_seed(seed)
    model = Encoder(ModelConfig(spec.n_items, spec.n_event_types, spec.n_gap_buckets)).eval()
    n_params = sum(p.numel() for p in model.parameters())
    save_checkpoint(root / "run" / "best.pt", model, spec, {"purpose": "benchmark", "params": n_params})
    export_bundle(root / "run", root / "bundle")
    (root / "model.json").write_text(json.dumps({"params": n_params, "n_items": n_items}))
    return root / "bundle"


def make_events(n: int, users: int, seed: int = 0, n_items: int = N_ITEMS,
                start_ms: int = 1_767_225_600_000) -> list[tuple[bytes, bytes]]:
    """`n` contract events (key = user id) from `users` users drawn uniformly, in time
    order, a few seconds apart per user."""
    from clickvec.contract.events import EVENT_TYPES

    rng = np.random.default_rng(seed)
    uids = rng.integers(0, users, n)
    items = rng.integers(0, n_items, n)
    types = rng.integers(0, len(EVENT_TYPES), n)
    ts = start_ms + np.cumsum(rng.integers(1, 200, n))
    out = []
    for u, it, et, t in zip(uids.tolist(), items.tolist(), types.tolist(), ts.tolist(), strict=True):
        uid = f"u{u}"
        out.append((uid.encode(), json.dumps({"user_id": uid, "item_id": f"item-{it}",
                                              "event_type": EVENT_TYPES[et], "ts": t},
                                             separators=(",", ":")).encode()))
    return out


# ------------------------------------------------------------------ kafka helpers


@contextmanager
def kafka(work: Path, bootstrap: str | None = None, *, start: bool = True,
          on_start: Callable[[Any], None] | None = None) -> Iterator[str | None]:
    """The broker a benchmark runs on: `bootstrap` when given, else a fresh one in
    `work/kafka` for the block (stopped after it); None when neither (`start` False).
    `on_start(broker)` runs once a fresh broker is up."""
    if bootstrap or not start:
        yield bootstrap
        return
    from clickvec.devtools import broker as broker_mod

    broker = broker_mod.start(work / "kafka", reset=True)
    try:
        if on_start is not None:
            on_start(broker)
        yield broker.bootstrap
    finally:
        broker.stop()


def create_topic(bootstrap: str, prefix: str, partitions: int) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, num_partitions=partitions)], operation_timeout=30)[name].result(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        t = admin.list_topics(topic=name, timeout=5).topics.get(name)
        if t is not None and t.error is None and len(t.partitions) == partitions and all(
                p.leader >= 0 for p in t.partitions.values()):
            return name
        time.sleep(0.05)
    raise RuntimeError(f"topic {name} did not appear")


class Sender:
    """One producer for a benchmark topic; remembers the wall-clock send time of every
    event by its "topic[partition]@offset" source."""

    def __init__(self, bootstrap: str, topic: str, linger_ms: float = 1) -> None:
        from confluent_kafka import Producer

        self.topic = topic
        self.p = Producer({"bootstrap.servers": bootstrap, "linger.ms": linger_ms,
                           "enable.idempotence": True, "compression.type": "lz4",
                           "queue.buffering.max.messages": 1_000_000,
                           "partitioner": "murmur2_random"})
        self.sent_at: dict[str, float] = {}
        self.errors = 0
        self.t_start = 0.0  # wall-clock start of the last `send`
        self.acked_at: dict[str, float] = {}

    def _cb(self, t: float):
        def cb(err: Any, msg: Any) -> None:
            if err is not None:
                self.errors += 1
            else:
                src = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
                self.sent_at[src] = t
                self.acked_at[src] = time.time()  # when the callback ran (at a poll)
        return cb

    def send(self, records: list[tuple[bytes, bytes]], rate: float | None = None,
             duration: float | None = None) -> tuple[int, float]:
        """Send in order, paced at `rate`/s when given (stopping after `duration` s);
        return (count sent, seconds).

        Paced: every message whose due time has passed is sent, then the sender sleeps
        until the next one is due (about 1 ms: at thousands of events/s messages leave
        in small bursts). Each message's send time is taken when it is handed to the
        producer. An earlier version spun on `poll(0)` between messages less than 0.5 ms
        apart and took most of a core from the worker it was measuring; it sleeps at least
        1 ms (sub-millisecond sleeps at high rates were close to a spin)."""
        self.t_start = time.time()
        t0 = time.perf_counter()
        n = 0
        total = len(records)
        if not rate:
            for k, v in records:
                produce_waiting(self.p, self.topic, k, v, self._cb(time.time()), wait=0.01)
                n += 1
                if n % 200 == 0:
                    self.p.poll(0)
        while rate and n < total:
            now = time.perf_counter()
            if duration is not None and now - t0 > duration:
                break
            due = min(total, int((now - t0) * rate) + 1)
            while n < due:
                k, v = records[n]
                produce_waiting(self.p, self.topic, k, v, self._cb(time.time()), wait=0.01)
                n += 1
            self.p.poll(0)
            wait = t0 + n / rate - time.perf_counter()
            if wait > 0:
                time.sleep(max(wait, 0.001))
        self.p.flush(60)
        if self.errors:
            raise RuntimeError(f"{self.errors} events not delivered")
        return n, time.perf_counter() - t0


class Reader:
    """Independent consumer of a contender's output topic: arrival time of every message."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from confluent_kafka import Consumer

        self.c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-reader-{uuid.uuid4().hex}",
                           "auto.offset.reset": "earliest", "enable.auto.commit": False,
                           "fetch.wait.max.ms": 5, "fetch.min.bytes": 1})
        self.c.subscribe([topic])
        self.values: list[bytes] = []
        self.arrived: list[float] = []

    def poll(self, seconds: float = 0.05) -> int:
        # consume() waits for its whole timeout unless num_messages are there: wait for
        # one message, then take what is already fetched, so arrival times stay exact.
        first = self.c.poll(seconds)
        if first is None:
            return 0
        now = time.time()
        msgs = [first, *self.c.consume(num_messages=20_000, timeout=0)]
        n = 0
        for m in msgs:
            if m.error() is not None:
                continue
            self.values.append(m.value())
            self.arrived.append(now)
            n += 1
        return n

    def close(self) -> None:
        self.c.close()


def source_of(value: bytes) -> str:
    """The input event's "topic[partition]@offset" of an output message (JSON or binary)."""
    from clickvec.contract.messages import VectorMessage

    if value[:1] == b"{":
        return json.loads(value)["source"]
    return VectorMessage.from_bytes(value).source


# ------------------------------------------------------------------ processes


class Child(ChildProcess):
    """A contender's worker process, with its log in a file and CPU / RSS from /proc."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(cmd, log_path, env, cwd=REPO)

    def start(self) -> Child:
        super().start()
        return self

    def cpu_s(self) -> float:
        """User + system CPU seconds of the process (all its threads) so far."""
        return cpu_s_of(self.pid)

    def peak_rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")


def cpu_s_of(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / TICKS


def percentiles(x: list[float] | np.ndarray) -> dict[str, float | None]:
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        return {"p50": None, "p99": None, "p999": None, "max": None}
    q = np.quantile(a, [0.5, 0.99, 0.999])
    return {"p50": float(q[0]), "p99": float(q[1]), "p999": float(q[2]), "max": float(a.max())}


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "load_average": list(os.getloadavg())}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name, dist in (("onnxruntime", "onnxruntime-gpu"), ("onnxruntime", "onnxruntime"),
                       ("faust", "faust-streaming"), ("aiokafka", "aiokafka"),
                       ("confluent-kafka", "confluent-kafka"), ("rocksdict", "rocksdict"),
                       ("numpy", "numpy")):
        if name in out:
            continue
        try:
            out[name] = version(dist)
        except PackageNotFoundError:
            pass
    try:
        from clickvec.devtools.broker import KAFKA_VERSION

        out["kafka"] = KAFKA_VERSION
    except ImportError:
        out["kafka"] = "4.1.1"
    return out


def python() -> str:
    return sys.executable
