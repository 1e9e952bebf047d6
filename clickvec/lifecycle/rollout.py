"""`clickvec rollout`: put a new model in service without losing any user's history and
without a gap in any user's vectors.

  clickvec rollout --from-model models/OLD --to-model models/NEW --from-group clickvec-stream \\
      --group 'clickvec-stream-{model}' --brokers HOST:PORT --in clicks --out user-vectors

With `--compare-data FILE` it first compares the two models on the same evaluation data
(clickvec/lifecycle/compare.py: next-item HR@10 / NDCG@10 of both, and the deltas) and
refuses, before anything is written, when the new model is worse on NDCG@10, unless
`--accept-drift`.

The new model's workers form their own consumer group, with their own state changelog
(`--group` with "{model}": named by the model id). The rollout, while the old workers keep
serving:

1. rebuilds every user's state under the new model from the input topic's retained
   history (as `clickvec backfill`), then again from where that read ended, round after
   round, until fewer than `--catch-up-events` events are left (caught up);
2. fixes the cut-over offsets X (per input partition: where the rebuild ended) and waits
   until the old group has committed X everywhere: every old-model vector of an event
   before X is then on the vector topic;
3. writes the cut-over control record into every vector-topic partition
   (clickvec/lifecycle/cutover.py documents it and how consumers follow it), then one
   new-model vector per user on the user's whole history before X;
4. writes the new states to the new group's changelog and commits X as its offsets;
5. says to start the new workers (`clickvec stream --model NEW --group GROUP`) and to stop
   the old ones, and reports the new group's lag until it is caught up.

Progress goes to stdout as one JSON object per line (`phase`: compare, rebuild, wait_old,
cutover, start_new, lag, done).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clickvec.errors import ClickvecError
from clickvec.lifecycle import groupstate
from clickvec.lifecycle.backfill import (
    add_backfill_arguments,
    changelog_replicas,
    held_logs,
    load_settings,
    publish,
    state_records,
    vector_records,
    write_group_state,
)
from clickvec.lifecycle.cutover import Cutover, publish_cutover
from clickvec.lifecycle.encode import Prior, Rebuilt, RecurrentSession, rebuild
from clickvec.lifecycle.history import History, end_offsets, read_topic
from clickvec.lifecycle.parallel import read_and_rebuild

log = logging.getLogger(__name__)


class RolloutError(ClickvecError):
    """The rollout could not go on. Action: the message says which group or topic; a
    rollout that stopped before the cut-over can be run again with --force."""


def say(phase: str, **fields: Any) -> None:
    print(json.dumps({"phase": phase, **fields}, default=str), flush=True)


@dataclass
class Book:
    """Every user's rebuilt state so far, one row per user (a `History` without events
    for the users' partitions and last offsets, a `Rebuilt` for their states)."""

    hist: History | None = None
    built: Rebuilt | None = None
    index: dict[str, int] = field(default_factory=dict)

    def prior(self, hist: History, layers: int, hidden: int) -> Prior | None:
        if self.built is None:
            return None
        U = len(hist.users)
        rows = np.array([self.index.get(u, -1) for u in hist.users], dtype=np.int64)
        known = rows >= 0
        h = np.zeros((U, layers, hidden), np.float32)
        c = np.zeros((U, layers, hidden), np.float32)
        seq = np.zeros(U, np.int64)
        last_ts = np.full(U, -1, np.int64)
        h[known], c[known] = self.built.h[rows[known]], self.built.c[rows[known]]
        seq[known], last_ts[known] = self.built.seq[rows[known]], self.built.last_ts[rows[known]]
        return Prior(h, c, seq, last_ts)

    def merge(self, hist: History, built: Rebuilt) -> None:
        if self.hist is None or self.built is None:
            self.hist, self.built = hist, built
            self.index = {u: i for i, u in enumerate(hist.users)}
            return
        book, b = self.hist, self.built
        new = [i for i, u in enumerate(hist.users) if u not in self.index]
        rows = np.array([self.index.get(u, -1) for u in hist.users], dtype=np.int64)
        old = rows >= 0
        for name in ("h", "c", "z", "surprise", "seq", "last_ts"):
            getattr(b, name)[rows[old]] = getattr(built, name)[old]
        book.last_offset[rows[old]] = hist.last_offset[old]
        if new:
            sel = np.array(new, dtype=np.int64)
            for name in ("h", "c", "z", "surprise", "seq", "last_ts"):
                setattr(b, name, np.concatenate([getattr(b, name), getattr(built, name)[sel]]))
            book.partition = np.concatenate([book.partition, hist.partition[sel]])
            book.last_offset = np.concatenate([book.last_offset, hist.last_offset[sel]])
            for i in new:
                self.index[hist.users[i]] = len(book.users)
                book.users.append(hist.users[i])
        book.ends = hist.ends


def rebuild_until_caught_up(cfg: Any, bundle: Any, session: RecurrentSession, catch_up: int,
                            max_rounds: int, workers: int = 0) -> Book:
    """Rebuild rounds (module docstring, step 1)."""
    book = Book()
    start: dict[int, int] | None = None
    for rnd in range(1, max_rounds + 1):
        t0 = time.perf_counter()
        if start is None:  # the whole retained history: in parallel when it is large
            hist, built, n_events = read_and_rebuild(cfg.librdkafka(), cfg.in_topic, bundle, workers=workers,
                                              threads=session.threads)
        else:
            hist = read_topic(cfg.librdkafka(), cfg.in_topic, bundle.spec, start=start)
            built = rebuild(session, hist, book.prior(hist, bundle.layers, bundle.hidden))
            n_events = hist.events
        book.merge(hist, built)
        start = hist.ends
        marks = end_offsets(cfg.librdkafka(), cfg.in_topic)
        left = sum(max(0, high - start.get(p, 0)) for p, (_, high) in marks.items())
        say("rebuild", round=rnd, events=n_events, users_rebuilt=len(book.index), seconds=round(
            time.perf_counter() - t0, 2), events_left=left)
        if left <= catch_up:
            break
    return book


def wait_old_group(cfg: Any, old_group: str, cut: dict[int, int], timeout: float) -> None:
    """Until the old group has committed at least the cut-over offsets (step 2)."""
    deadline = time.monotonic() + timeout
    last_say = 0.0
    while True:
        have = groupstate.committed_offsets(cfg.librdkafka(), old_group, cfg.in_topic, cut)
        behind = {p: o - have.get(p, 0) for p, o in cut.items() if have.get(p, -1) < o}
        if not behind:
            return
        if time.monotonic() - last_say > 2:
            say("wait_old", group=old_group, events_behind=sum(behind.values()))
            last_say = time.monotonic()
        if time.monotonic() > deadline:
            raise RolloutError(f"the old group {old_group!r} has not reached the cut-over offsets within "
                               f"{timeout:.0f}s ({sum(behind.values())} events behind on partitions "
                               f"{sorted(behind)}): is it running?")
        time.sleep(0.5)


def report_lag(cfg: Any, cut: dict[int, int], timeout: float, caught_up: int) -> int:
    """The new group's lag until it is at most `caught_up` events (step 5); the lag."""
    deadline = time.monotonic() + timeout
    while True:
        marks = end_offsets(cfg.librdkafka(), cfg.in_topic)
        have = groupstate.committed_offsets(cfg.librdkafka(), cfg.group, cfg.in_topic, marks)
        lag = sum(max(0, high - have.get(p, cut.get(p, 0))) for p, (_, high) in marks.items())
        say("lag", group=cfg.group, lag=lag)
        if lag <= caught_up or time.monotonic() > deadline:
            return lag
        time.sleep(2.0)


def check_drift(args: argparse.Namespace, bundle: Any) -> None:
    """--compare-data: the comparison (the `compare` phase: both models' figures and the
    deltas); a RolloutError when the new model is worse and --accept-drift is not given."""
    from clickvec.bundle.reader import load_bundle
    from clickvec.lifecycle.compare import compare

    old = load_bundle(args.from_model, providers="cpu", warmup=False)
    r = compare(old, bundle, args.compare_data)
    say("compare", **{k: r[k] for k in ("cases", "headline", "worse", "delta")},
        old=r["old"], new=r["new"])
    if r["worse"] and not args.accept_drift:
        p = r["headline"].split(".")[0]
        n = r["headline"].split(".")[1]
        raise RolloutError(f"the new model is worse than the old one on {r['headline']} "
                           f"({r['new'][p][n]:.4f} vs {r['old'][p][n]:.4f} on {r['cases']} cases of "
                           f"{args.compare_data}): nothing written; --accept-drift to roll it out anyway")


def rollout(cfg: Any, bundle: Any, old_model_id: str, old_group: str, args: argparse.Namespace) -> int:
    from clickvec.stream.worker.probe import cluster_metadata

    if args.compare_data:
        check_drift(args, bundle)

    md = cluster_metadata(cfg)
    topic = md.topics.get(cfg.in_topic)
    if topic is None or topic.error is not None:
        raise RolloutError(f"input topic {cfg.in_topic!r} does not exist on {cfg.brokers}")
    partitions = len(topic.partitions)
    if old_group == cfg.group:
        raise RolloutError(f"the new model's group {cfg.group!r} is the old one's: give --group its own name "
                           "(e.g. 'clickvec-stream-{model}')")
    if not args.force:
        groupstate.check_fresh(cfg.librdkafka(), cfg.group, cfg.in_topic, range(partitions))
    session = RecurrentSession(bundle, args.threads)
    book = rebuild_until_caught_up(cfg, bundle, session, args.catch_up_events, args.max_rounds, args.workers)
    assert book.hist is not None and book.built is not None
    cut = dict(book.hist.ends)
    wait_old_group(cfg, old_group, cut, args.old_timeout)
    out = md.topics.get(cfg.out_topic)
    out_partitions = len(out.partitions) if out is not None and out.error is None else partitions
    cfg.connection().ensure_topic(cfg.out_topic, out_partitions)
    pub = groupstate.Publisher(cfg.librdkafka())
    publish_cutover(pub, cfg.out_topic, out_partitions, Cutover(bundle.model_id, old_model_id, cfg.in_topic, cut))
    pub.flush()
    say("cutover", model_id=bundle.model_id, from_model_id=old_model_id, offsets=cut)
    publish(cfg, vector_records(bundle, book.hist, book.built, cfg.encoding))
    write_group_state(cfg, partitions, changelog_replicas(cfg, len(md.brokers)),
                      state_records(bundle, book.hist, book.built, cfg.state_dtype), cut)
    say("start_new", group=cfg.group, users_rebuilt=len(book.index),
        command=f"clickvec stream --model {cfg.model} --group {cfg.group} --in {cfg.in_topic} --out {cfg.out_topic}",
        then=f"stop the workers of group {old_group}")
    lag = report_lag(cfg, cut, args.lag_timeout, args.catch_up_events) if args.lag_timeout > 0 else -1
    say("done", group=cfg.group, lag=lag, users_rebuilt=len(book.index))
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clickvec rollout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backfill_arguments(p)
    p.add_argument("--from-model", required=True, help="the model bundle in service now (its model id)")
    p.add_argument("--from-group", default="clickvec-stream", help="the old workers' group (default %(default)s)")
    p.add_argument("--catch-up-events", type=int, default=1000,
                   help="rebuild rounds until at most this many events are left (default %(default)s)")
    p.add_argument("--max-rounds", type=int, default=5)
    p.add_argument("--old-timeout", type=float, default=300.0,
                   help="seconds to wait for the old group to reach the cut-over offsets")
    p.add_argument("--lag-timeout", type=float, default=600.0,
                   help="seconds to report the new group's lag until it is caught up (0: do not wait)")
    p.add_argument("--compare-data", default=None,
                   help="event file: compare both models on it first (clickvec compare) and refuse if the new one "
                        "is worse on NDCG@10")
    p.add_argument("--accept-drift", action="store_true",
                   help="with --compare-data: roll out even if the new model is worse")
    argv = ["--model" if a == "--to-model" else a for a in argv]
    args = p.parse_args(argv)
    try:
        with held_logs():
            from clickvec.stream.worker.config import model_group

            cfg, bundle = load_settings(args)
            old_group = model_group(args.from_group, args.from_model) if "{model}" in args.from_group \
                else args.from_group
            from clickvec.bundle.reader import verify_bundle

            old_model_id = str(verify_bundle(args.from_model)[0]["model_id"])
        return rollout(cfg, bundle, old_model_id, old_group, args)
    except (ClickvecError, ValueError, OSError) as e:
        print(f"clickvec rollout: {e}", file=sys.stderr)
        return 2
