"""`clickvec run`: the whole pipeline in one command.

  clickvec run                       # local broker, synthetic users, train, export, stream
  clickvec run --quick --duration 60 # tiny model (~20 s to build), one minute of traffic
  clickvec run --brokers HOST:PORT --data events.parquet

Stages: start the local Kafka broker (unless --brokers), write the events into the
workdir (synthetic, or --data), train a small encoder and export its bundle (skipped
when the workdir already holds a build of the same config), create the topics, start
`clickvec stream`, `clickvec alerts` and `clickvec recommend` as child processes (logs
in WORKDIR/logs), replay the events into the click topic at --rate with a few malformed
messages mixed in, and show what happens. Ctrl-C, SIGTERM or --duration end it: the
producer stops, the pipeline drains, the children get SIGTERM, the broker (if started
here) stops, and WORKDIR/run_summary.{json,md} record the figures.

Event times are the data's own (the model's gap features and the alert windows depend
on them), so latency is measured independently of event time: from the moment an event
was produced (its Kafka CreateTime) to the moment its vector reached this process's
consumer of the vector topic.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clickvec import __version__
from clickvec.contract.messages import DeadLetter, VectorMessage
from clickvec.errors import ClickvecError
from clickvec.kafka import PARTITION_EOF, KafkaConnection, add_kafka_arguments, produce_waiting
from clickvec.run.view import LatencyHistogram, Screen, Snapshot, percentiles

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
TOPICS = {"in": "clicks", "out": "user-vectors", "dlq": "clicks-dlq", "alerts": "alerts",
          "recs": "recommendations"}
QUICK_USERS = 800
DEFAULT_USERS = 3000
HOLDOUT_FRACTION = 0.2  # users never seen by training (their events still stream live)
# Malformed messages mixed into the live traffic so the dead-letter path shows.
_MALFORMED: tuple[bytes, ...] = (
    b"this is not json",
    b"",
    b'{"user_id":"u-bad","event_type":"view","ts":1767225600000}',  # missing item_id
    b'{"user_id":"u-bad","item_id":"i1","event_type":"view","ts":12}',  # ts out of range
    b'{"user_id":"u-bad","item_id":"i1","event_type":"payment","ts":1767225600000,"amount":-5}',
    b'["an","array"]',
)


class RunError(ClickvecError):
    """A stage of `clickvec run` failed. The message names the stage and the log file to
    read (WORKDIR/logs/STAGE.log); fix that and run again: finished stages are reused."""


@dataclass(frozen=True)
class RunConfig:
    workdir: str
    brokers: str | None  # None: start the local broker in WORKDIR/kafka
    data: str | None  # None: synthetic users
    users: int
    seed: int
    train_minutes: float
    duration: float | None  # seconds of live traffic; None: until Ctrl-C / SIGTERM
    rate: float
    quick: bool
    dashboard: bool
    partitions: int
    malformed_every: int
    k: int
    topic_suffix: str
    connection: KafkaConnection = field(default_factory=KafkaConnection, repr=False)

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["connection"] = self.connection.redacted()
        return d


# ------------------------------------------------------------------------ arguments


def parse_args(argv: list[str]) -> RunConfig:
    p = argparse.ArgumentParser(prog="clickvec run", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:3]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=".clickvec/run", help="everything this job writes (default %(default)s)")
    p.add_argument("--data", default=None, help="event file (.parquet/.jsonl/.csv); default: synthetic users")
    p.add_argument("--users", type=int, default=None,
                   help=f"synthetic users (default {DEFAULT_USERS}, {QUICK_USERS} with --quick)")
    p.add_argument("--seed", type=int, default=0, help="synthetic data and training seed (default %(default)s)")
    p.add_argument("--train-minutes", type=float, default=2.0, help="training budget (default %(default)s)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of live traffic, then stop (default: until Ctrl-C / SIGTERM)")
    p.add_argument("--rate", type=float, default=2000.0, help="events per second produced (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny model and data: ready in about 20 s")
    p.add_argument("--no-dashboard", dest="dashboard", action="store_false",
                   help="a status line every few seconds instead of the live view (automatic off a TTY)")
    p.add_argument("--partitions", type=int, default=4, help="partitions of the click topic (default %(default)s)")
    p.add_argument("--malformed-every", type=int, default=2000,
                   help="one malformed message per N events, 0: none (default %(default)s)")
    p.add_argument("--k", type=int, default=10, help="recommendations per user (default %(default)s)")
    p.add_argument("--topic-suffix", default=None,
                   help="appended to every topic name (default: none on the local broker, '-RUNID' with "
                        "--brokers, so runs never mix)")
    add_kafka_arguments(p)
    p.set_defaults(brokers=None)  # no --brokers: start the local broker
    a = p.parse_args(argv)
    if a.rate <= 0:
        p.error("--rate must be > 0")
    users = a.users if a.users is not None else (QUICK_USERS if a.quick else DEFAULT_USERS)
    return RunConfig(
        workdir=a.workdir, brokers=a.brokers, data=a.data, users=users, seed=a.seed,
        train_minutes=a.train_minutes, duration=a.duration, rate=a.rate, quick=a.quick,
        dashboard=a.dashboard and sys.stdout.isatty(), partitions=a.partitions,
        malformed_every=a.malformed_every, k=a.k,
        topic_suffix=a.topic_suffix if a.topic_suffix is not None else "",
        connection=KafkaConnection.from_args(a),
    )


# --------------------------------------------------------------------------- build


@dataclass
class Build:
    events: Path  # all events, replayed live
    train_events: Path  # the training users' events
    run_dir: Path  # training run: best.pt, metrics.json, report.md, plots
    bundle: Path  # exported model bundle
    model_id: str
    reused: bool
    seconds: float
    labels: dict[str, str]  # user -> planted anomaly kind (synthetic data only)
    training: dict[str, Any]


def train_flags(cfg: RunConfig) -> list[str]:
    if cfg.quick:
        return ["--epochs", "2", "--hidden", "32", "--z-dim", "16", "--item-dim", "16",
                "--max-minutes", str(min(cfg.train_minutes, 0.5))]
    return ["--epochs", "20", "--hidden", "64", "--z-dim", "32", "--item-dim", "32",
            "--max-minutes", str(cfg.train_minutes)]


def build_key(cfg: RunConfig) -> dict[str, Any]:
    """What the built artifacts depend on; a second run with the same key reuses them."""
    if cfg.data:
        st = Path(cfg.data).stat()
        src: dict[str, Any] = {"data": str(Path(cfg.data).resolve()), "size": st.st_size,
                               "mtime_ns": st.st_mtime_ns}
    else:
        src = {"synthetic_users": cfg.users, "seed": cfg.seed}
    return {"source": src, "holdout": HOLDOUT_FRACTION, "train_flags": train_flags(cfg),
            "seed": cfg.seed, "clickvec": __version__}


def _holdout(user: str) -> bool:
    return int(hashlib.sha1(user.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < HOLDOUT_FRACTION


def _run_stage(name: str, cmd: list[str], logs: Path, env: dict[str, str] | None = None) -> None:
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"{name}.log"
    t0 = time.monotonic()
    with open(path, "wb") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if rc != 0:
        tail = "\n".join(path.read_text(errors="replace").splitlines()[-25:])
        raise RunError(f"{name} failed (exit {rc}); log {path}\n{tail}")
    log.info("%s done in %.1f s (log %s)", name, time.monotonic() - t0, path)


def _labels(table: Any) -> dict[str, str]:
    if "label" not in table.schema.names:
        return {}
    import pyarrow.compute as pc

    bad = table.filter(pc.not_equal(table.column("label"), "normal"))
    return dict(zip(bad.column("user_id").to_pylist(), bad.column("label").to_pylist(), strict=True))


def build(cfg: RunConfig, work: Path) -> Build:
    """Events, training run and bundle in `work`; reused when build.json matches."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from clickvec.eventfile import read_table, write_events

    t0 = time.monotonic()
    data_dir, run_dir, bundle, logs = work / "data", work / "train", work / "model", work / "logs"
    events, train_events = data_dir / "events.parquet", data_dir / "train.parquet"
    key = build_key(cfg)
    state_path = work / "build.json"
    old = None
    with contextlib.suppress(OSError, ValueError):
        old = json.loads(state_path.read_text())
    reuse = (old is not None and old.get("key") == key and (bundle / "manifest.json").is_file()
             and (run_dir / "metrics.json").is_file() and events.is_file())
    if reuse:
        log.info("reusing the build in %s (same config): model %s", work, old["model_id"][:12])
        table = read_table(events)
    else:
        state_path.unlink(missing_ok=True)
        for d in (run_dir, bundle):
            shutil.rmtree(d, ignore_errors=True)
        if cfg.data:
            log.info("reading %s", cfg.data)
            table = read_table(cfg.data)
        else:
            from clickvec.devtools.synth import SynthConfig, generate_table

            log.info("generating %d synthetic users (seed %d)", cfg.users, cfg.seed)
            table = generate_table(SynthConfig(n_users=cfg.users, seed=cfg.seed))
        table = table.sort_by([("ts", "ascending")]) if cfg.data else table
        write_events(table, events)
        users = table.column("user_id").to_pylist()
        keep = pa.array([not _holdout(u) for u in users])
        write_events(table.filter(keep), train_events)
        log.info("%d events, %d users -> %s (%d training events)", table.num_rows,
                 len(pc.unique(table.column("user_id"))), events, int(pc.sum(keep).as_py()))
        py = [sys.executable, "-m", "clickvec.cli"]
        _run_stage("train", [*py, "train", "--data", str(train_events), "--out", str(run_dir),
                             "--no-progress", "--seed", str(cfg.seed), *train_flags(cfg)], logs)
        _run_stage("export", [*py, "export", str(run_dir), "--out", str(bundle), "--force"], logs)
    manifest = json.loads((bundle / "manifest.json").read_text())
    model_id = manifest["model_id"]
    if not reuse:
        state_path.write_text(json.dumps({"key": key, "model_id": model_id, "built_at": time.time()},
                                          indent=2) + "\n")
    training: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        m = json.loads((run_dir / "metrics.json").read_text())
        test = m.get("test", {})
        training = {
            "test_model": test.get("model"), "test_markov": test.get("markov"),
            "test_popularity": test.get("popularity"), "margins": m.get("margins"),
        }
    return Build(events, train_events, run_dir, bundle, model_id, reuse,
                 round(time.monotonic() - t0, 2), _labels(table), training)


# ---------------------------------------------------------------------- processes


def _child_setup() -> None:
    """Runs in each child before exec: its own session (Ctrl-C in the terminal reaches
    only this job, which then stops the children in order) and SIGTERM when this job
    dies (Linux), so no worker outlives a killed run."""
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Child:
    """A `clickvec` subcommand in a child process, its output in a log file."""

    def __init__(self, name: str, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.cmd = [sys.executable, "-m", "clickvec.cli", *args]
        self.log_path = log_path
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.status = "not started"

    def start(self) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as f:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env}, preexec_fn=_child_setup,
            )
        self.status = "running"
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> str:
        if self.proc is not None and self.status == "running" and self.proc.poll() is not None:
            self.status = f"exited ({self.proc.returncode})"
            log.warning("%s exited with %d; log %s\n%s", self.name, self.proc.returncode,
                        self.log_path, self.log_tail(15))
        return self.status

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
                self.proc.kill()
                self.proc.wait(10)
            if self.status == "running":
                self.status = "stopped" if self.proc.returncode in (0, -signal.SIGTERM) else \
                    f"stopped (exit {self.proc.returncode})"
        else:
            self.check()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def _module_available(name: str) -> bool:
    return (REPO_ROOT / Path(*name.split("."))).with_suffix(".py").is_file()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_get(url: str, timeout: float = 0.5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def wait_worker_ready(worker: Child, port: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not worker.alive():
            raise RunError(f"the stream worker exited ({worker.check()}); log {worker.log_path}\n"
                           + worker.log_tail())
        with contextlib.suppress(OSError):
            if _http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200:
                return
        time.sleep(0.5)
    raise RunError(f"the stream worker was not ready within {timeout:.0f} s; log {worker.log_path}\n"
                   + worker.log_tail())


def wait_group_members(admin_conf: dict[str, Any], groups: list[str], children: list[Child],
                       timeout: float = 30.0) -> None:
    """Until every consumer group has a member with partitions (they read from the
    earliest offset anyway: this only keeps start-up latency out of the figures)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(admin_conf)
    pending = dict(zip(groups, children, strict=True))
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for g, child in list(pending.items()):
            if not child.alive():
                pending.pop(g)
                continue
            try:
                desc = admin.describe_consumer_groups([g], request_timeout=5)[g].result(5)
                if any(m.assignment and m.assignment.topic_partitions for m in desc.members):
                    pending.pop(g)
            except Exception:  # noqa: BLE001 - the group does not exist yet
                pass
        time.sleep(0.3)
    if pending:
        log.warning("consumer groups %s not assigned after %.0f s; going on", list(pending), timeout)


# ------------------------------------------------------------------ live producer


class LiveProducer(threading.Thread):
    """Replays the event file into the click topic at `rate`, in event-time order.
    Each pass after the first renames the users (`u00012~2`), so every pass starts
    fresh states and the counts stay one vector per event. Records each delivered
    event's CreateTime by partition and offset, for the latency measurement."""

    def __init__(self, conf: dict[str, Any], topic: str, events: Path, rate: float, malformed_every: int) -> None:
        super().__init__(name="live-producer", daemon=True)
        from clickvec.eventfile import read_table

        t = read_table(events)
        self.cols = [t.column(n).to_pylist() for n in
                     ("user_id", "item_id", "event_type", "ts", "category", "amount", "session_id")]
        self.n_events = t.num_rows
        self.conf = conf
        self.topic = topic
        self.rate = rate
        self.malformed_every = malformed_every
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.sent = 0
        self.delivered = 0  # valid events acknowledged
        self.delivered_bad = 0  # malformed messages acknowledged
        self.failed = 0
        self.errors: list[str] = []
        self.passes = 0
        self.create_ts: dict[tuple[int, int], int] = {}

    def _records(self) -> Iterator[tuple[bytes | None, bytes, bool]]:
        n = 0
        p = 0
        while True:
            p += 1
            self.passes = p
            sfx = "" if p == 1 else f"~{p}"
            for u, item, et, ts, cat, amount, sess in zip(*self.cols, strict=True):
                uid = u + sfx
                d: dict[str, Any] = {"user_id": uid, "item_id": item, "event_type": et, "ts": ts}
                if cat is not None:
                    d["category"] = cat
                if amount is not None:
                    d["amount"] = amount
                if sess is not None:
                    d["session_id"] = sess + sfx
                yield uid.encode(), json.dumps(d, separators=(",", ":")).encode(), False
                n += 1
                if self.malformed_every and n % self.malformed_every == 0:
                    bad = _MALFORMED[(n // self.malformed_every - 1) % len(_MALFORMED)]
                    yield b"bad-client", bad, True

    def run(self) -> None:
        from confluent_kafka import Producer

        from clickvec.devtools.produce import TokenBucket

        producer = Producer({**self.conf, "linger.ms": 5, "enable.idempotence": True,
                             "compression.type": "lz4", "queue.buffering.max.messages": 200_000})

        def on_delivery(err: Any, msg: Any) -> None:
            bad = msg.key() == b"bad-client"
            with self.lock:
                if err is not None:
                    self.failed += 1
                    if len(self.errors) < 5:
                        self.errors.append(str(err))
                elif bad:
                    self.delivered_bad += 1
                else:
                    self.delivered += 1
                    self.create_ts[(msg.partition(), msg.offset())] = msg.timestamp()[1]

        bucket = TokenBucket(self.rate)
        try:
            for key, value, _bad in self._records():
                if self.stop_event.is_set():
                    break
                bucket.take()
                produce_waiting(producer, self.topic, key, value, on_delivery)
                self.sent += 1
                producer.poll(0)
        finally:
            left = producer.flush(30)
            if left:
                log.warning("%d messages still queued after 30 s", left)

    def stop(self) -> None:
        self.stop_event.set()


# ------------------------------------------------------------------------ observer

_SOURCE = re.compile(r"^(.*)\[(\d+)\]@(\d+)$")


class Observer(threading.Thread):
    """An independent consumer of the vector, dead-letter, alert and recommendation
    topics (its own group, from the earliest offset): counts everything the pipeline
    published and keeps what the dashboard shows."""

    def __init__(self, conf: dict[str, Any], topics: dict[str, str], group: str, in_topic: str) -> None:
        super().__init__(name="observer", daemon=True)
        self.conf = conf
        self.topics = topics
        self.group = group
        self.in_topic = in_topic
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.finish_event = threading.Event()
        self.finished = threading.Event()
        self.counts = {k: 0 for k in topics}
        self.dead: dict[str, int] = {}
        self.pending: deque[tuple[int, int, int, int]] = deque()  # partition, offset, recv ms, emit ms
        self.surprise: dict[str, deque[float]] = {}
        self.last: dict[str, tuple[float, int, list[float], float]] = {}  # user -> (seen, seq, z, s)
        self.alert_users: set[str] = set()
        self.latest_alerts: deque[str] = deque(maxlen=3)
        self.latest_rec = ""
        self.undecodable = 0
        self.model_ids: set[str] = set()
        self.last_vector_at = 0.0
        self.error: str | None = None

    def run(self) -> None:
        from confluent_kafka import Consumer

        by_name = {v: k for k, v in self.topics.items()}
        c = Consumer({**self.conf, "group.id": self.group, "auto.offset.reset": "earliest",
                      "enable.auto.commit": False, "enable.partition.eof": False,
                      "isolation.level": "read_committed"})
        c.subscribe(list(self.topics.values()))
        finish_deadline = None
        try:
            while not self.stop_event.is_set():
                msgs = c.consume(num_messages=2000, timeout=0.2)
                now_ms = int(time.time() * 1000)
                with self.lock:
                    for m in msgs:
                        err = m.error()
                        if err is not None:
                            if err.code() != PARTITION_EOF:
                                log.debug("observer: %s", err)
                            continue
                        self._handle(by_name[m.topic()], m, now_ms)
                if self.finish_event.is_set() and not msgs:
                    finish_deadline = finish_deadline or time.monotonic() + 30
                    if self._caught_up(c) or time.monotonic() > finish_deadline:
                        break
        except Exception as e:  # noqa: BLE001 - reported in the summary
            self.error = str(e)
            log.exception("observer failed")
        finally:
            c.close()
            self.finished.set()

    def _caught_up(self, c: Any) -> bool:
        assignment = c.assignment()
        if len({tp.topic for tp in assignment}) < len(self.topics):
            return False
        for tp in c.position(assignment):
            _, high = c.get_watermark_offsets(tp, timeout=5, cached=False)
            if high > 0 and tp.offset < high:
                return False
        return True

    def _handle(self, kind: str, m: Any, now_ms: int) -> None:
        self.counts[kind] += 1
        value = m.value() or b""
        if kind == "out":
            try:
                v = VectorMessage.from_bytes(value)
            except (ValueError, TypeError, KeyError):
                self.undecodable += 1
                return
            self.model_ids.add(v.model_id)
            src = _SOURCE.match(v.source)
            if src and src.group(1) == self.in_topic:
                self.pending.append((int(src.group(2)), int(src.group(3)), now_ms, v.emit_ts))
            q = self.surprise.setdefault(v.user_id, deque(maxlen=3))
            q.append(v.surprise)
            self.last[v.user_id] = (time.monotonic(), v.seq, v.vector, v.surprise)
            self.last_vector_at = time.monotonic()
        elif kind == "dlq":
            try:
                reason = DeadLetter.from_bytes(value).reason
            except (ValueError, TypeError, KeyError):
                reason = "?"
            self.dead[reason] = self.dead.get(reason, 0) + 1
        elif kind == "alerts":
            user = (m.key() or b"").decode(errors="replace")
            self.alert_users.add(user)
            self.latest_alerts.appendleft(_short_json(value))
        elif kind == "recs":
            self.latest_rec = _short_json(value)

    def finish(self, timeout: float = 45.0) -> None:
        """Read every topic to its end, then stop."""
        self.finish_event.set()
        self.finished.wait(timeout)
        self.stop_event.set()
        self.join(10)


_NOT_SHOWN = ("model_id", "source", "emit_ts")  # the same on every line, or noise


def _short_json(value: bytes, limit: int = 160) -> str:
    try:
        d = json.loads(value)
    except ValueError:
        return value[:limit].decode(errors="replace")
    if isinstance(d, dict):
        parts = []
        for k, v in d.items():
            if k in _NOT_SHOWN:
                continue
            if isinstance(v, float):
                v = round(v, 3)
            elif isinstance(v, list) and len(v) > 5:
                v = [round(x, 3) if isinstance(x, float) else x for x in v[:5]] + ["…"]
            elif isinstance(v, dict):
                v = {kk: round(vv, 2) if isinstance(vv, float) else vv for kk, vv in list(v.items())[:4]}
            parts.append(f"{k}={v}")
        s = " ".join(parts)
    else:
        s = json.dumps(d)
    return s[:limit]


# --------------------------------------------------------------------------- the job


@contextlib.contextmanager
def _logs_off_screen(live: bool) -> Iterator[None]:
    """Log lines would tear the live view: while it shows, they go to the log file only."""
    saved: list[tuple[logging.Handler, int]] = []
    if live:
        for h in logging.getLogger().handlers:
            if not isinstance(h, logging.FileHandler):
                saved.append((h, h.level))
                h.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for h, level in saved:
            h.setLevel(level)
        if live:
            sys.stdout.write("\n")


def _base_user(u: str) -> str:
    return u.split("~", 1)[0]


class Job:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.work = Path(cfg.workdir).resolve()
        self.logs = self.work / "logs"
        self.run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]
        self.stop_requested = threading.Event()
        self.skip_drain = threading.Event()
        self.stop_reason = ""
        self.broker: Any = None
        self.children: dict[str, Child] = {}
        self.producer: LiveProducer | None = None
        self.observer: Observer | None = None
        self.latency = LatencyHistogram()  # produced -> vector received here
        self.emit_latency = LatencyHistogram()  # produced -> vector emitted by the worker
        self.window: deque[tuple[float, float]] = deque()  # (monotonic, ms) last 10 s
        self.unmatched = 0
        self.rates: deque[tuple[float, int, int, float | None]] = deque()
        self.watched: list[str] = []
        self.worker_port = 0
        self.metrics: dict[str, float] = {}
        self.t_stream = 0.0
        self.t_stream_end = 0.0

    # -- signals
    def request_stop(self, reason: str) -> None:
        if not self.stop_requested.is_set():
            self.stop_reason = reason
            self.stop_requested.set()

    def _install_signals(self) -> None:
        def on_signal(signum: int, _frame: Any) -> None:
            if self.stop_requested.is_set():
                self.skip_drain.set()  # a second Ctrl-C / SIGTERM: stop without waiting
            self.request_stop(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    # -- run
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        self._install_signals()
        log.info("clickvec run %s: %s", self.run_id, json.dumps(cfg.describe()))
        t0 = time.monotonic()
        summary: dict[str, Any] = {"run_id": self.run_id, "started_at": time.time(), "config": cfg.describe()}
        try:
            self.b = self._build_while_broker_starts()
            summary["build"] = {"reused": self.b.reused, "seconds": self.b.seconds}
            if self.stop_requested.is_set():
                raise RunError(f"stopped by {self.stop_reason} before streaming")
            self._start_pipeline()
            summary["startup_seconds"] = round(time.monotonic() - t0, 2)
            with _logs_off_screen(cfg.dashboard):
                self._stream()
                self._drain()
        except BaseException as e:
            summary["error"] = f"{type(e).__name__}: {e}"
            raise
        finally:
            self._shutdown()
            if "error" in summary:  # what was done before the failure, for the post-mortem
                with contextlib.suppress(Exception):
                    summary.update(self._figures())
                    summary["ended_at"] = time.time()
                    summary["stopped_by"] = "error"
                    self._write_summary(summary)
        summary.update(self._figures())
        summary["ended_at"] = time.time()
        summary["stopped_by"] = self.stop_reason or "duration"
        self._write_summary(summary)
        return summary

    def _build_while_broker_starts(self) -> Build:
        """The build runs in a thread while this (main) thread starts the broker: the
        broker is tied to the thread that starts it and must outlive the build."""
        result: dict[str, Any] = {}

        def target() -> None:
            try:
                result["build"] = build(self.cfg, self.work)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                result["error"] = e

        t = threading.Thread(target=target, name="build", daemon=True)
        t.start()
        if self.cfg.brokers is None:
            from clickvec.devtools import broker

            kdir = self.work / "kafka"
            shutil.rmtree(kdir, ignore_errors=True)  # a fresh cluster: fresh topics, right counts
            log.info("starting the local Kafka broker in %s", kdir)
            self.broker = broker.start(kdir, die_with_parent=True)
            self.bootstrap = self.broker.bootstrap
        while t.is_alive():
            t.join(0.5)
            if self.stop_requested.is_set():
                raise RunError(f"stopped by {self.stop_reason} while building")
        if "error" in result:
            raise result["error"]
        return result["build"]

    def _start_pipeline(self) -> None:
        cfg, b = self.cfg, self.b
        sfx = cfg.topic_suffix
        if cfg.brokers is None:
            pass  # started by _build_while_broker_starts
        else:
            self.bootstrap = cfg.brokers
            if not sfx:
                sfx = "-" + self.run_id
        self.topics = {k: v + sfx for k, v in TOPICS.items()}
        conn = dataclasses.replace(cfg.connection, brokers=self.bootstrap)
        self.conf = conn.client_config()
        for name in self.topics.values():
            conn.ensure_topic(name, cfg.partitions)
        kafka_args = conn.flags()
        env = conn.child_env()
        state_dir = self.work / "state"
        shutil.rmtree(state_dir, ignore_errors=True)
        self.worker_port = _free_port()
        t = self.topics
        self.children["stream"] = Child("stream", [
            "stream", "--model", str(b.bundle), *kafka_args, "--in", t["in"], "--out", t["out"],
            "--dlq", t["dlq"], "--group", f"clickvec-run-{self.run_id}", "--state-dir", str(state_dir),
            "--web-port", str(self.worker_port)], self.logs / "stream.log", env).start()
        groups: list[str] = []
        waits: list[Child] = []
        for name, module, args in (
            ("alerts", "clickvec.stream.consumers.alerts", ["--out", t["alerts"]]),
            ("recommend", "clickvec.stream.consumers.recommend", ["--out", t["recs"], "--model", str(b.bundle),
                                               "--k", str(cfg.k)]),
        ):
            if not _module_available(module):
                self.children[name] = Child(name, [], self.logs / f"{name}.log")
                self.children[name].status = f"unavailable ({module.replace('.', '/')}.py missing)"
                log.warning("clickvec %s is unavailable: %s.py is missing", name, module.replace(".", "/"))
                continue
            group = f"clickvec-run-{name}-{self.run_id}"
            self.children[name] = Child(name, [
                name, *kafka_args, "--in", t["out"], *args, "--group", group,
                "--summary", str(self.work / f"{name}_summary.json")], self.logs / f"{name}.log", env).start()
            groups.append(group)
            waits.append(self.children[name])
        self.observer = Observer(self.conf, {k: t[k] for k in ("out", "dlq", "alerts", "recs")},
                                 f"clickvec-run-view-{self.run_id}", t["in"])
        self.observer.start()
        log.info("waiting for the stream worker (log %s)", self.logs / "stream.log")
        wait_worker_ready(self.children["stream"], self.worker_port)
        wait_group_members(self.conf, groups, waits)
        for c in self.children.values():
            c.check()
        self.producer = LiveProducer(self.conf, t["in"], b.events, cfg.rate, cfg.malformed_every)

    def _stream(self) -> None:
        cfg = self.cfg
        assert self.producer is not None
        screen = Screen(live=cfg.dashboard)
        self.t_stream = time.monotonic()
        self.producer.start()
        log.info("streaming %d events per pass at %.0f ev/s into %s", self.producer.n_events, cfg.rate,
                 self.topics["in"])
        try:
            while not self.stop_requested.is_set():
                elapsed = time.monotonic() - self.t_stream
                if cfg.duration is not None and elapsed >= cfg.duration:
                    break
                self._tick()
                screen.show(self.snapshot("streaming"))
                worker = self.children["stream"]
                if worker.check() != "running":
                    self.request_stop("stream worker exit")
                    break
                if self.producer.errors:
                    self.request_stop(f"produce error: {self.producer.errors[0]}")
                    break
                self.stop_requested.wait(max(0.0, 1.0 - (time.monotonic() - self.t_stream - elapsed)))
        except KeyboardInterrupt:
            self.request_stop("SIGINT")
        self.producer.stop()
        self.producer.join(60)
        self.t_stream_end = time.monotonic()
        with self.producer.lock:
            log.info("producer stopped: %d events and %d malformed messages delivered",
                     self.producer.delivered, self.producer.delivered_bad)

    def _drain(self, timeout: float = 600.0) -> None:
        """Let the worker and the consumers catch up before they are stopped, as long as
        they make progress (a second Ctrl-C / SIGTERM skips the wait)."""
        assert self.producer is not None and self.observer is not None
        screen = Screen(live=self.cfg.dashboard, every=2.0)
        deadline = time.monotonic() + timeout
        last, last_change = None, time.monotonic()
        while time.monotonic() < deadline and not self.skip_drain.is_set():
            self._tick()
            with self.observer.lock:
                now = (self.observer.counts["out"], self.observer.counts["dlq"],
                       self.observer.counts["alerts"], self.observer.counts["recs"])
            done_worker = now[0] >= self.producer.delivered and now[1] >= self.producer.delivered_bad
            if now != last:
                last, last_change = now, time.monotonic()
            if done_worker and time.monotonic() - last_change > 3.0:
                return
            if time.monotonic() - last_change > 15.0:
                log.warning("the pipeline stopped making progress while draining")
                return
            if self.children["stream"].check() != "running":
                return
            if self.cfg.dashboard:
                screen.show(self.snapshot("draining (producer stopped)"))
            time.sleep(1.0)
        if not self.skip_drain.is_set():
            log.warning("drain timed out after %.0f s", timeout)

    def _shutdown(self) -> None:
        for name in ("recommend", "alerts", "stream"):
            c = self.children.get(name)
            if c is not None:
                c.stop()
        if self.observer is not None and self.observer.is_alive():
            self.observer.finish()
            self._tick()
        if self.producer is not None and self.producer.is_alive():
            self.producer.stop()
            self.producer.join(30)
        if self.broker is not None:
            log.info("stopping the local Kafka broker")
            self.broker.stop()

    # -- measurements
    def _tick(self) -> None:
        """Match vectors to their events' produce times; sample rates and worker metrics."""
        now = time.monotonic()
        obs, prod = self.observer, self.producer
        if obs is None or prod is None:
            return
        with obs.lock:
            pending = list(obs.pending)
            obs.pending.clear()
        keep = []
        wall_ms = time.time() * 1000
        with prod.lock:
            for p, off, recv_ms, emit_ms in pending:
                created = prod.create_ts.pop((p, off), None)
                if created is None:
                    if wall_ms - recv_ms < 30_000:
                        keep.append((p, off, recv_ms, emit_ms))
                    else:
                        self.unmatched += 1
                    continue
                ms = max(0.0, recv_ms - created)
                self.latency.add(ms)
                self.emit_latency.add(max(0.0, emit_ms - created))
                self.window.append((now, ms))
        if keep:
            with obs.lock:
                obs.pending.extendleft(reversed(keep))
        while self.window and self.window[0][0] < now - 10:
            self.window.popleft()
        self._scrape_worker()
        with obs.lock:
            vectors = obs.counts["out"]
        worker_in = self.metrics.get("clickvec_events_in_total")
        self.rates.append((now, prod.sent, vectors, worker_in))
        while len(self.rates) > 2 and self.rates[0][0] < now - 5:
            self.rates.popleft()

    def _scrape_worker(self) -> None:
        if not self.worker_port:
            return
        try:
            status, body = _http_get(f"http://127.0.0.1:{self.worker_port}/metrics")
        except OSError:
            return
        if status != 200:
            return
        m: dict[str, float] = {}
        lag = 0.0
        for line in body.decode(errors="replace").splitlines():
            if line.startswith("#") or " " not in line:
                continue
            name, _, value = line.rpartition(" ")
            try:
                v = float(value)
            except ValueError:
                continue
            if name.startswith("clickvec_consumer_lag{"):
                lag += v
            elif "{" not in name:
                m[name] = v
        m["lag"] = lag
        self.metrics = m

    def snapshot(self, phase: str) -> Snapshot:
        obs, prod = self.observer, self.producer
        assert obs is not None and prod is not None
        s = Snapshot(phase=phase, brokers=self.bootstrap, model_id=self.b.model_id, duration_s=self.cfg.duration,
                     workdir=str(self.work))
        s.elapsed_s = time.monotonic() - self.t_stream
        with prod.lock:
            s.produced, s.malformed = prod.delivered, prod.delivered_bad
        if len(self.rates) >= 2:
            (t0, p0, v0, w0), (t1, p1, v1, w1) = self.rates[0], self.rates[-1]
            dt = max(1e-6, t1 - t0)
            s.in_rate, s.out_rate = (p1 - p0) / dt, (v1 - v0) / dt
            if w0 is not None and w1 is not None:
                s.worker_in_rate = (w1 - w0) / dt
        s.lag = int(self.metrics["lag"]) if "lag" in self.metrics else None
        s.latency_now = percentiles([ms for _, ms in self.window])
        s.latency_all = self.latency.summary()
        now = time.monotonic()
        with obs.lock:
            s.vectors = obs.counts["out"]
            s.dead_letters = dict(obs.dead)
            s.alerts, s.recommendations = obs.counts["alerts"], obs.counts["recs"]
            s.latest_alerts = list(obs.latest_alerts)
            s.latest_recommendation = obs.latest_rec
            for u in [u for u, v in obs.last.items() if now - v[0] > 60]:  # forget idle users
                obs.last.pop(u, None)
                obs.surprise.pop(u, None)
            recent = [(sum(q) / len(q), u) for u, q in obs.surprise.items()
                      if u in obs.last and now - obs.last[u][0] < 15 and len(q) == q.maxlen]
            recent.sort(reverse=True)
            s.top_surprise = [(u, sc, obs.last[u][1], self.b.labels.get(_base_user(u), ""))
                              for sc, u in recent[:5]]
            self.watched = [u for u in self.watched if u in obs.last and now - obs.last[u][0] < 20]
            if len(self.watched) < 3:
                busiest = sorted((v[1], u) for u, v in obs.last.items()
                                 if now - v[0] < 5 and u not in self.watched)
                self.watched += [u for _, u in busiest[::-1][: 3 - len(self.watched)]]
            s.watched = [(u, obs.last[u][1], obs.last[u][2], obs.last[u][3]) for u in self.watched]
        s.components = {name: c.check() if c.status == "running" else c.status
                        for name, c in self.children.items()}
        return s

    # -- summary
    def _figures(self) -> dict[str, Any]:
        prod, obs = self.producer, self.observer
        out: dict[str, Any] = {
            "brokers": getattr(self, "bootstrap", self.cfg.brokers),
            "local_broker": self.cfg.brokers is None,
            "topics": getattr(self, "topics", {}),
        }
        b = getattr(self, "b", None)
        if b is not None:
            out["model"] = {"model_id": b.model_id, "bundle": str(b.bundle), "training_run": str(b.run_dir),
                            "training_report": str(b.run_dir / "report.md"), "training": b.training}
            out["paths"] = {"workdir": str(self.work), "events": str(b.events), "train_events": str(b.train_events),
                            "logs": str(self.logs), "summary_json": str(self.work / "run_summary.json"),
                            "summary_md": str(self.work / "run_summary.md")}
        out["components"] = {n: c.status for n, c in self.children.items()}
        if prod is None or obs is None:
            return out
        secs = max(1e-6, (self.t_stream_end or time.monotonic()) - self.t_stream)
        out_secs = max(1e-6, obs.last_vector_at - self.t_stream)
        with obs.lock:
            counts = dict(obs.counts)
            alert_users = {_base_user(u) for u in obs.alert_users}
            dead = dict(obs.dead)
            model_ids = sorted(obs.model_ids)
        anomalous = set(b.labels) if b is not None else set()
        out["counts"] = {
            "events_produced": prod.delivered,
            "malformed_produced": prod.delivered_bad,
            "messages_produced": prod.delivered + prod.delivered_bad,
            "produce_failures": prod.failed,
            "replay_passes": prod.passes,
            "vectors_published": counts["out"],
            "dead_letters": counts["dlq"],
            "dead_letters_by_reason": dead,
            "alerts": counts["alerts"],
            "recommendations": counts["recs"],
        }
        out["throughput"] = {
            "streaming_seconds": round(secs, 2),
            "events_per_s": round(prod.delivered / secs, 1),
            # over the time until the last vector arrived (the worker catches up after the producer stops)
            "vectors_per_s": round(counts["out"] / out_secs, 1),
            "seconds_to_last_vector": round(out_secs, 2),
        }
        out["latency_ms"] = {"produce_to_vector_received": self.latency.summary(),
                             "produce_to_vector_emitted": self.emit_latency.summary(),
                             "unmatched_vectors": self.unmatched}
        out["vector_model_ids"] = model_ids
        if anomalous:
            out["alerts_vs_planted_anomalies"] = {
                "alerted_users": len(alert_users),
                "alerted_planted_anomalous": len(alert_users & anomalous),
                "planted_anomalous_users": len(anomalous),
            }
        if self.metrics:
            out["worker_metrics"] = {k: v for k, v in self.metrics.items()
                                     if k.startswith("clickvec_") and not k.endswith("_created")}
        for name in ("alerts", "recommend"):
            p = self.work / f"{name}_summary.json"
            with contextlib.suppress(OSError, ValueError):
                if p.stat().st_mtime >= self.t_stream:
                    out[f"{name}_summary"] = {k: v for k, v in json.loads(p.read_text()).items() if k != "config"}
        if obs.error:
            out["observer_error"] = obs.error
        return out

    def _write_summary(self, s: dict[str, Any]) -> None:
        path = self.work / "run_summary.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(s, indent=2, default=str) + "\n")
        tmp.replace(path)
        (self.work / "run_summary.md").write_text(summary_markdown(s))


def summary_markdown(s: dict[str, Any]) -> str:
    c = s.get("counts", {})
    t = s.get("throughput", {})
    lat = s.get("latency_ms", {}).get("produce_to_vector_received", {})
    emit = s.get("latency_ms", {}).get("produce_to_vector_emitted", {})
    m = s.get("model", {})
    lines = [
        f"# clickvec run {s['run_id']}",
        "",
        f"- stopped by: {s.get('stopped_by')}; brokers {s.get('brokers')}"
        f"{' (local, started by this run)' if s.get('local_broker') else ''}",
        f"- model `{m.get('model_id', '?')[:16]}` — bundle `{m.get('bundle')}`, training report "
        f"`{m.get('training_report')}`; build {'reused' if s.get('build', {}).get('reused') else 'fresh'} "
        f"({s.get('build', {}).get('seconds')} s)",
        f"- components: {s.get('components')}",
        "",
        "| figure | value |",
        "|---|---|",
        f"| events produced | {c.get('events_produced')} (+{c.get('malformed_produced')} malformed) |",
        f"| vectors published | {c.get('vectors_published')} |",
        f"| dead letters | {c.get('dead_letters')} {c.get('dead_letters_by_reason', '')} |",
        f"| alerts | {c.get('alerts')} |",
        f"| recommendations | {c.get('recommendations')} |",
        f"| streaming seconds | {t.get('streaming_seconds')} |",
        f"| throughput | {t.get('events_per_s')} ev/s in, {t.get('vectors_per_s')} vec/s out |",
        f"| latency produce → vector received | p50 {lat.get('p50')} ms, p95 {lat.get('p95')} ms, "
        f"p99 {lat.get('p99')} ms (n={lat.get('n')}) |",
        f"| latency produce → vector emitted | p50 {emit.get('p50')} ms, p95 {emit.get('p95')} ms, "
        f"p99 {emit.get('p99')} ms |",
    ]
    a = s.get("alerts_vs_planted_anomalies")
    if a:
        lines.append(f"| alerted users that are planted anomalies | {a['alerted_planted_anomalous']} of "
                     f"{a['alerted_users']} alerted ({a['planted_anomalous_users']} planted) |")
    lines += ["", f"Topics: {s.get('topics')}", "", f"Logs: `{s.get('paths', {}).get('logs')}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(list(sys.argv[1:] if argv is None else argv))
    work = Path(cfg.workdir)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(work / "logs" / "run.log")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(fh)
    if not logging.getLogger().handlers[:-1]:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO)
    job = Job(cfg)
    try:
        s = job.run()
    except (ClickvecError, OSError) as e:
        print(f"clickvec run: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("clickvec run: interrupted", file=sys.stderr)
        return 130
    print(summary_markdown(s))
    failed = [n for n, st in s.get("components", {}).items() if st.startswith(("exited", "stopped (exit"))]
    return 1 if "stream" in failed else 0


if __name__ == "__main__":
    sys.exit(main())
