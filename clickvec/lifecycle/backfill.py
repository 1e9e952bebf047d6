"""`clickvec backfill`: every user's state built offline from their history, handed to the
live worker so it continues exactly where the history ends.

  clickvec backfill --model models/NAME --brokers HOST:PORT --in clicks --out user-vectors \\
      --group clickvec-stream [--until 0:1000,1:980] [--file events.parquet] [--force]

From the input topic's retained records (up to its end offsets now, or `--until`
PARTITION:OFFSET per partition) or from an event file (`--file`: history that is not in
the topic; each user goes to the partition `--partitioner` puts its key in), in order:

1. every user's state is computed with the bundle, many users per ONNX Runtime call;
2. one vector per user (after its last event) goes to the vector topic;
3. the states go to the group's state changelog (`<group>-user-state-changelog`, the key,
   value and partition the worker's table uses), so a worker starting afterwards
   recovers them;
4. from a topic: the offsets covered are committed as the group's offsets, so the worker
   consumes from the first event after the history: none skipped, none applied twice.

Takes the worker's settings (the same flags, CLICKVEC_* variables or --config file as
`clickvec stream`). Refuses a group that already has committed offsets or changelog
records, unless --force.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from clickvec.errors import ClickvecError
from clickvec.lifecycle import groupstate
from clickvec.lifecycle.encode import Rebuilt, RecurrentSession, rebuild
from clickvec.lifecycle.history import PARTITIONERS, History, read_file
from clickvec.lifecycle.parallel import read_and_rebuild

log = logging.getLogger(__name__)


@dataclass
class BackfillReport:
    group: str
    model_id: str
    source: str
    users: int = 0
    events: int = 0
    skipped: int = 0
    vectors: int = 0
    offsets: dict[int, int] = field(default_factory=dict)  # committed: partition -> next offset
    changelog: str = ""
    check_s: float = 0.0  # metadata, group and changelog checks
    rebuild_s: float = 0.0  # history read and states computed
    onnx_s: float = 0.0  # ONNX Runtime calls (summed over processes)
    write_s: float = 0.0  # vectors published, states written, offsets committed
    seconds: float = 0.0
    events_per_s: float = 0.0


def parse_offsets(text: str | None) -> dict[int, int] | None:
    """`"0:100,1:250"` -> {0: 100, 1: 250}."""
    if not text:
        return None
    out: dict[int, int] = {}
    try:
        for part in text.split(","):
            p, o = part.split(":")
            out[int(p)] = int(o)
    except ValueError:
        raise ClickvecError(f"--until {text!r}: expected PARTITION:OFFSET[,PARTITION:OFFSET...]") from None
    return out


def vector_records(bundle: Any, hist: History, built: Rebuilt, encoding: str = "json",
                   users: np.ndarray | None = None) -> list[tuple[bytes, bytes]]:
    """(key, value) of each user's latest vector message (`users`: indices, default all)."""
    from clickvec.contract.messages import VectorMessage

    now = int(time.time() * 1000)
    out = []
    idx = range(len(hist.users)) if users is None else users.tolist()
    for u in idx:
        if built.seq[u] <= 0:
            continue
        uid = hist.users[u]
        off = int(hist.last_offset[u])
        source = f"{hist.source}[{int(hist.partition[u])}]@{off}" if off >= 0 else f"backfill:{hist.source}"
        msg = VectorMessage(uid, bundle.model_id, int(built.seq[u]), int(built.last_ts[u]), now,
                            built.z[u], float(built.surprise[u]), source)
        out.append((uid.encode(), msg.to_bytes(encoding)))
    return out


def state_records(bundle: Any, hist: History, built: Rebuilt, state_dtype: str = "f32"
                  ) -> list[tuple[bytes, bytes, int]]:
    """(key, packed UserState, changelog partition) per user, as the worker's table holds it."""
    from clickvec.stream.worker.state import UserState, model_id_prefix

    prefix = model_id_prefix(bundle.model_id)
    out = []
    for u, uid in enumerate(hist.users):
        p = int(hist.partition[u])
        st = UserState(prefix, int(built.seq[u]), p, int(hist.last_offset[u]), int(built.last_ts[u]),
                       built.h[u], built.c[u])
        out.append((uid.encode(), st.pack(state_dtype), p))
    return out


def write_group_state(cfg: Any, partitions: int, replicas: int, states: list[tuple[bytes, bytes, int]],
                      offsets: dict[int, int]) -> str:
    """States to the group's changelog (waited for), then the offsets committed."""
    name = groupstate.ensure_changelog(cfg.connection(), cfg.group, partitions, replicas)
    pub = groupstate.Publisher(cfg.librdkafka())
    for key, value, p in states:
        pub.send(name, key, value, partition=p)
    pub.flush()
    if offsets:
        groupstate.commit_offsets(cfg.librdkafka(), cfg.group, cfg.in_topic, offsets)
    return name


def changelog_replicas(cfg: Any, brokers: int) -> int:
    """stream/worker/app.py `changelog_replicas` (importing app.py would pull in Faust)."""
    return cfg.replication_factor if cfg.replication_factor > 0 else max(1, min(3, brokers))


def publish(cfg: Any, records: list[tuple[bytes, bytes]]) -> None:
    pub = groupstate.Publisher(cfg.librdkafka())
    for key, value in records:
        pub.send(cfg.out_topic, key, value)
    pub.flush()


def backfill(cfg: Any, bundle: Any, file: str | None = None, partitioner: str = "consistent_random",
             until: dict[int, int] | None = None, force: bool = False, batch_users: int = 4096,
             threads: int = 0, workers: int = 0) -> BackfillReport:
    """The whole backfill (module docstring); `cfg` is a resolved StreamConfig."""
    from clickvec.stream.worker.probe import cluster_metadata

    t0 = time.perf_counter()
    md = cluster_metadata(cfg)
    topic = md.topics.get(cfg.in_topic)
    if topic is None or topic.error is not None:
        raise ClickvecError(f"input topic {cfg.in_topic!r} does not exist on {cfg.brokers}")
    partitions = len(topic.partitions)
    conn = cfg.connection()
    if not force:
        groupstate.check_fresh(cfg.librdkafka(), cfg.group, cfg.in_topic, range(partitions))
    t1 = time.perf_counter()
    if file:
        hist = read_file(file, bundle.spec, partitions, partitioner)
        built, events = rebuild(RecurrentSession(bundle, threads), hist, batch_users=batch_users), hist.events
    else:
        hist, built, events = read_and_rebuild(cfg.librdkafka(), cfg.in_topic, bundle, until, workers,
                                               batch_users, threads)
    t2 = time.perf_counter()
    conn.ensure_topic(cfg.out_topic, partitions)
    vectors = vector_records(bundle, hist, built, cfg.encoding)
    publish(cfg, vectors)  # first: a stored state implies its vector was published
    replicas = changelog_replicas(cfg, len(md.brokers))
    offsets = {} if file else hist.ends
    name = write_group_state(cfg, partitions, replicas, state_records(bundle, hist, built, cfg.state_dtype),
                             offsets)
    t3 = time.perf_counter()
    rep = BackfillReport(cfg.group, bundle.model_id, hist.source, len(hist.users), events, hist.skipped,
                         len(vectors), offsets, name, round(t1 - t0, 3), round(t2 - t1, 3), round(built.infer_s, 3),
                         round(t3 - t2, 3), round(t3 - t0, 3))
    rep.events_per_s = round(events / max(t3 - t0, 1e-9), 1)
    log.info("backfill: %d users, %d events (%d skipped) in %.1fs", rep.users, rep.events, rep.skipped,
             rep.seconds)
    return rep


def add_backfill_arguments(p: argparse.ArgumentParser) -> None:
    from clickvec.stream.worker import config as config_mod

    config_mod.add_arguments(p)
    p.add_argument("--file", default=None, help="event file (parquet/jsonl/csv) instead of the topic's history")
    p.add_argument("--partitioner", choices=PARTITIONERS, default="consistent_random",
                   help="--file: how the events' producer places keys (default %(default)s, as clickvec produce)")
    p.add_argument("--force", action="store_true",
                   help="write even if the group has committed offsets or changelog records")
    p.add_argument("--batch-users", type=int, default=4096, help="users per ONNX Runtime call")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: one per core)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes reading and rebuilding partitions of a large history (0: one per core)")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clickvec backfill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backfill_arguments(p)
    p.add_argument("--until", default=None, help="PARTITION:OFFSET[,...]: stop each partition before OFFSET")
    args = p.parse_args(argv)
    try:
        with held_logs():
            cfg, bundle = load_settings(args)
            rep = backfill(cfg, bundle, args.file, args.partitioner, parse_offsets(args.until), args.force,
                           args.batch_users, args.threads, args.workers)
    except (ClickvecError, ValueError, OSError) as e:
        print(f"clickvec backfill: {e}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(rep)))
    return 0


def load_settings(args: argparse.Namespace) -> tuple[Any, Any]:
    """The worker's resolved settings and its verified bundle."""
    from clickvec.bundle.reader import load_bundle
    from clickvec.stream.worker import config as config_mod

    cfg = config_mod.resolve(args)
    return cfg, load_bundle(cfg.model, providers=cfg.providers, trust=cfg.trust or None)


@contextlib.contextmanager
def held_logs() -> Iterator[None]:
    """The root logger's records are held back and shown only when the block succeeds:
    a command that fails prints its one line alone."""
    root = logging.getLogger()
    held: list[logging.LogRecord] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    saved, root.handlers = root.handlers[:], [Hold()]
    try:
        yield
    finally:
        root.handlers = saved
    for record in held:
        logging.getLogger(record.name).handle(record)
