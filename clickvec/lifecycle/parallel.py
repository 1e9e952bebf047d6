"""A topic's history read and rebuilt by several processes, one share of the partitions
each: a user's events all live in one partition, so partitions rebuild independently.

Reading is Python work per event (the contract's parser, as the worker's), so one
process would use one core while ONNX Runtime waits; with one process per core (each
ONNX Runtime session on one thread) reading and rebuilding fill every core; this
process does one share itself. Small histories are done in this process alone: starting
a process costs more than they do.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from clickvec.lifecycle.encode import Rebuilt, RecurrentSession, rebuild
from clickvec.lifecycle.history import History, end_offsets, read_topic

log = logging.getLogger(__name__)

IN_PROCESS_EVENTS = 200_000  # below this many events: no child processes


@dataclass(frozen=True)
class Share:
    conf: dict[str, Any]
    topic: str
    bundle_path: str
    providers: str | list[str]
    partitions: tuple[int, ...]
    until: dict[int, int] | None
    batch_users: int
    threads: int
    pruned: bytes | None = None  # the pruned step graph (RecurrentSession.pruned_model)


def _light(hist: History) -> History:
    """The history without its per-event columns (what the caller still needs)."""
    empty = np.empty(0, np.int64)
    return History(hist.source, hist.users, np.zeros(len(hist.users) + 1, np.int64), empty, empty, empty,
                   hist.partition, hist.last_offset, hist.ends, hist.starts_at, hist.skipped)


def _run_share(share: Share) -> tuple[History, Rebuilt, int]:
    from clickvec.bundle.reader import load_bundle

    bundle = load_bundle(share.bundle_path, providers=share.providers, intra_op_threads=share.threads,
                         warmup=False)
    hist = read_topic(share.conf, share.topic, bundle.spec, until=share.until, partitions=share.partitions)
    built = rebuild(RecurrentSession(bundle, share.threads, share.pruned), hist, batch_users=share.batch_users)
    return _light(hist), built, hist.events


def _concat(parts: list[tuple[History, Rebuilt, int]]) -> tuple[History, Rebuilt, int]:
    hs, bs = [p[0] for p in parts], [p[1] for p in parts]
    users = [u for h in hs for u in h.users]
    empty = np.empty(0, np.int64)
    hist = History(hs[0].source, users, np.zeros(len(users) + 1, np.int64), empty, empty, empty,
                   np.concatenate([h.partition for h in hs]), np.concatenate([h.last_offset for h in hs]),
                   {p: o for h in hs for p, o in h.ends.items()}, {p: o for h in hs for p, o in h.starts_at.items()},
                   sum(h.skipped for h in hs))
    cat = {name: np.concatenate([getattr(b, name) for b in bs]) for name in
           ("h", "c", "z", "surprise", "seq", "last_ts")}
    return hist, Rebuilt(**cat, infer_s=sum(b.infer_s for b in bs)), sum(p[2] for p in parts)


def read_and_rebuild(conf: dict[str, Any], topic: str, bundle: Any, until: dict[int, int] | None = None,
                     workers: int = 0, batch_users: int = 4096, threads: int = 0
                     ) -> tuple[History, Rebuilt, int]:
    """Every user's state from the topic's history (`read_topic` + `rebuild`), with
    `workers` processes (0: one per core) when the history is large. Returns the history
    (users, partitions, offsets; per-event columns only when done in this process), the
    states, and the number of events applied."""
    marks = end_offsets(conf, topic)
    ends = {p: high if until is None or p not in until else min(high, until[p]) for p, (_, high) in marks.items()}
    total = sum(max(0, ends[p] - low) for p, (low, _) in marks.items())
    workers = min(workers or os.cpu_count() or 1, len(marks))
    if workers <= 1 or total < IN_PROCESS_EVENTS:
        hist = read_topic(conf, topic, bundle.spec, until=ends)
        built = rebuild(RecurrentSession(bundle, threads), hist, batch_users=batch_users)
        return hist, built, hist.events
    parts = sorted(marks)
    log.info("rebuilding %d events of %s in %d processes", total, topic, workers)
    # spawn: the parent may already run librdkafka threads, which a fork would copy half-way.
    # The children start first (their interpreters start while this process prunes the
    # graph); this process does the first share itself: it has the bundle loaded already.
    with multiprocessing.get_context("spawn").Pool(workers - 1) as pool:
        session = RecurrentSession(bundle, 1)
        shares = [Share(conf, topic, str(bundle.path), bundle.providers, tuple(parts[i::workers]), ends,
                        batch_users, 1, session.pruned_model) for i in range(workers)]
        pending = pool.map_async(_run_share, shares[1:])
        hist = read_topic(conf, topic, bundle.spec, until=ends, partitions=shares[0].partitions)
        built = rebuild(session, hist, batch_users=batch_users)
        return _concat([(_light(hist), built, hist.events), *pending.get()])
