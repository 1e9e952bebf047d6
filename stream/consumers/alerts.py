"""`clickvec alerts`: fraud alerting on the vector topic.

  clickvec alerts --brokers HOST:PORT --in user-vectors --out alerts --threshold 4

A consumer-group member (see `loop`): for every vector message it
updates the user's small state and scores the event with `AlertScorer`; when the score
crosses the threshold it publishes one alert JSON (key = user id), at most one per user
per cooldown (event time), then commits the batch.

The score adds four standardised, per-user smoothed signals:
  surprise  the model's -log p(item) - log p(event type) for the event (how unexpected
            the whole event was), against the global baseline,
  own       the same surprise against the user's own usual surprise (slow EWMA),
  movement  cosine distance between the user's previous and new vector,
  rate      the user's events in the last minute of event time (log scale).
Each is standardised by running statistics over all messages seen, so one threshold
fits any model. Surprise carries the weight: legitimate fast sessions (power browsing in
the user's own categories) are as fast as fraud but not surprising. `alerts_eval`
scores the same code offline against the synthetic labels.

Per-user state is in memory: a restart resumes from the committed offsets with fresh
state, which warms up again within a few events per user. A tombstone on the vector
topic (the user forgotten, or expired from the worker's state) drops the user's state
and the alerts kept for the summary; the user's next vectors (seq 1 again) start afresh.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clickvec.contract.messages import VectorMessage
from clickvec.stream.consumers.loop import Record, add_loop_arguments, run_command, start_checks

log = logging.getLogger(__name__)

DEFAULT_ALERT_TOPIC = "alerts"
DEFAULT_GROUP = "clickvec-alerts"


# ----------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class AlertConfig:
    threshold: float = 2.4
    cooldown_ms: int = 10 * 60_000  # at most one alert per user per this much event time
    alpha: float = 0.35  # per-user EWMA weight of the newest event
    baseline_alpha: float = 0.1  # per-user slow EWMA: the user's own usual surprise
    rate_window_ms: int = 60_000
    # Surprise carries most of the weight: it scores the whole event (item and type), so
    # legitimate fast sessions in the user's own categories stay calm while card testing
    # (payment after payment) and takeover (never-touched categories) light up. The
    # rate only adds: on its own it cannot tell power browsing from fraud.
    w_surprise: float = 1.0
    w_own: float = 0.25
    w_movement: float = 0.05
    w_rate: float = 0.15
    min_events: int = 3  # a user's first events only warm its state up
    warmup_messages: int = 50  # no alert before the global statistics have seen this many
    max_users: int = 1_000_000  # least recently seen users are forgotten beyond this


class RunningStats:
    """Mean and standard deviation of a stream (Welford), with a floor on the deviation."""

    def __init__(self, floor: float = 1e-3) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.floor = floor

    def update(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    @property
    def std(self) -> float:
        return max(self.floor, math.sqrt(self.m2 / self.n)) if self.n > 1 else 1.0

    def z(self, x: float) -> float:
        return (x - self.mean) / self.std if self.n > 1 else 0.0


@dataclass
class UserAlertState:
    n: int = 0
    last_seq: int = 0
    e_surprise: float = 0.0
    e_own: float = 0.0  # smoothed surprise above the user's own baseline (global std units)
    base_surprise: float | None = None  # the user's own usual surprise (slow EWMA)
    e_movement: float = 0.0
    e_rate: float = 0.0
    last_vector: np.ndarray | None = None
    last_model: str = ""  # the model of last_vector: vectors of two models are not compared
    times: deque[int] = field(default_factory=deque)
    last_alert_ts: int | None = None


@dataclass(frozen=True)
class Scored:
    """One message's score and what it is made of."""

    user_id: str
    seq: int
    event_ts: int
    score: float
    surprise: float
    movement: float
    rate_per_min: int
    parts: dict[str, float]
    alert: bool
    source: str = ""
    model_id: str = ""
    replay: bool = False  # a (user, seq) already scored: the vector topic is at-least-once

    def reason(self) -> str:
        names = {"surprise": "surprising events", "own": "unusual for this user", "movement": "behaviour vector shift",
                 "rate": "event burst"}
        top = sorted(self.parts.items(), key=lambda kv: -kv[1])
        return " + ".join(names[k] for k, v in top if v > 0.25 * max(1e-9, top[0][1])) or "combined"

    def alert_json(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "model_id": self.model_id,
            "score": round(self.score, 4),
            "reason": self.reason(),
            "evidence": {
                "surprise": round(self.surprise, 4),
                "movement": round(self.movement, 5),
                "events_last_minute": self.rate_per_min,
                "parts": {k: round(v, 4) for k, v in self.parts.items()},
                "seq": self.seq,
                "event_ts": self.event_ts,
                "source": self.source,
            },
            "alert_ts": int(time.time() * 1000),
        }


class AlertScorer:
    """Pure per-user scoring: feed messages in each user's seq order; no Kafka here."""

    def __init__(self, cfg: AlertConfig = AlertConfig()) -> None:
        self.cfg = cfg
        self.users: dict[str, UserAlertState] = {}
        self.surprise_stats = RunningStats()
        self.movement_stats = RunningStats(1e-4)
        self.replays = 0
        self.rate_stats = RunningStats(0.25)  # log events per window: identical rates are common

    def score(self, m: VectorMessage) -> Scored:
        cfg = self.cfg
        st = self.users.pop(m.user_id, None) or UserAlertState()
        self.users[m.user_id] = st  # most recently seen last (dict order)
        if len(self.users) > cfg.max_users:
            del self.users[next(iter(self.users))]
        if st.n > 0 and m.seq <= st.last_seq:
            if m.seq == st.last_seq and m.model_id != st.last_model:
                # A rollout's first vector of the new model restates the last event
                # (clickvec/lifecycle/cutover.py): the reference for the next movement.
                st.last_vector, st.last_model = np.asarray(m.vector, dtype=np.float32), m.model_id
            self.replays += 1
            return Scored(m.user_id, m.seq, m.event_ts, 0.0, float(m.surprise), 0.0, len(st.times),
                          {"surprise": 0.0, "own": 0.0, "movement": 0.0, "rate": 0.0}, False, m.source, m.model_id,
                          replay=True)
        st.last_seq = m.seq
        v = np.asarray(m.vector, dtype=np.float32)
        movement = 0.0
        if st.last_vector is not None and st.last_vector.shape == v.shape and st.last_model == m.model_id:
            den = float(np.linalg.norm(st.last_vector) * np.linalg.norm(v))
            movement = 1.0 - float(st.last_vector @ v) / den if den > 0 else 0.0
        st.last_vector, st.last_model = v, m.model_id
        st.times.append(m.event_ts)
        while st.times and st.times[0] <= m.event_ts - cfg.rate_window_ms:
            st.times.popleft()
        rate = len(st.times)
        log_rate = math.log(rate)
        surprise = float(m.surprise)
        # Standardise against what came before, then learn from this message.
        zs = self.surprise_stats.z(surprise)
        zm = self.movement_stats.z(movement) if st.n > 0 else 0.0
        zr = self.rate_stats.z(log_rate)
        self.surprise_stats.update(surprise)
        if st.n > 0:
            self.movement_stats.update(movement)
        self.rate_stats.update(log_rate)
        a = cfg.alpha
        base = self.surprise_stats.mean if st.base_surprise is None else st.base_surprise
        zo = (surprise - base) / self.surprise_stats.std
        # A new user's smoothed signals start at the population's norm (0), so a single
        # event never carries its full weight.
        st.e_surprise = a * zs + (1 - a) * st.e_surprise
        st.e_own = a * zo + (1 - a) * st.e_own
        st.e_movement = a * zm + (1 - a) * st.e_movement
        # The rate is already a window over recent events: no extra smoothing.
        st.e_rate = zr
        b = cfg.baseline_alpha
        st.base_surprise = surprise if st.base_surprise is None else b * surprise + (1 - b) * st.base_surprise
        st.n += 1
        parts = {
            "surprise": cfg.w_surprise * max(0.0, st.e_surprise),
            "own": cfg.w_own * max(0.0, st.e_own),
            "movement": cfg.w_movement * max(0.0, st.e_movement),
            "rate": cfg.w_rate * max(0.0, st.e_rate),
        }
        total = sum(parts.values())
        alert = (
            st.n >= cfg.min_events
            and self.surprise_stats.n >= cfg.warmup_messages
            and total >= cfg.threshold
            and (st.last_alert_ts is None or m.event_ts - st.last_alert_ts >= cfg.cooldown_ms)
        )
        if alert:
            st.last_alert_ts = m.event_ts
        return Scored(m.user_id, m.seq, m.event_ts, total, surprise, movement, rate, parts, alert,
                      m.source, m.model_id)


# --------------------------------------------------------------------------------- CLI


class AlertHandler:
    def __init__(self, cfg: AlertConfig) -> None:
        self.scorer = AlertScorer(cfg)
        self.scored = 0
        self.kept: dict[str, list[dict[str, Any]]] = {}  # alerts kept for the summary, per user (bounded)
        self.n_kept = 0
        self.forgotten = 0  # vector-topic tombstones seen

    @property
    def alerts(self) -> list[dict[str, Any]]:
        """The alerts kept for the summary, in the order they were published per user."""
        return sorted((a for kept in self.kept.values() for a in kept), key=lambda a: a["alert_ts"])

    def forget(self, user_id: str) -> list[Record]:
        """A vector-topic tombstone: drop what is held about the user (nothing to publish:
        the alerts already published are the alert topic's own records)."""
        self.scorer.users.pop(user_id, None)
        self.n_kept -= len(self.kept.pop(user_id, ()))
        self.forgotten += 1
        return []

    def __call__(self, batch: Sequence[VectorMessage]) -> list[Record]:
        out: list[Record] = []
        for m in batch:
            r = self.scorer.score(m)
            self.scored += 1
            if r.alert:
                a = r.alert_json()
                if self.n_kept < 100_000:
                    self.kept.setdefault(m.user_id, []).append(a)
                    self.n_kept += 1
                out.append((m.user_id.encode(), json.dumps(a, separators=(",", ":")).encode()))
        return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clickvec alerts", description=__doc__.split("\n\n")[0])
    add_loop_arguments(p, DEFAULT_ALERT_TOPIC, DEFAULT_GROUP)
    d = AlertConfig()
    p.add_argument("--threshold", type=float, default=d.threshold, help="alert score (default %(default)s)")
    p.add_argument("--cooldown", type=float, default=d.cooldown_ms / 1000,
                   help="seconds of event time between a user's alerts (default %(default)s)")
    p.add_argument("--labels", default=None,
                   help="synthetic event file with labels: evaluate the alerts into the summary")
    args = p.parse_args(argv)
    cfg = AlertConfig(threshold=args.threshold, cooldown_ms=int(args.cooldown * 1000))
    if args.labels and not Path(args.labels).is_file():
        print(f"clickvec alerts: the labels file {args.labels!r} (--labels) does not exist", file=sys.stderr)
        return 2
    started = start_checks("clickvec alerts", args, lambda: None)
    if isinstance(started, int):
        return started
    loop = started[0]
    log.info("alerts config: %s %s", loop.describe(), asdict(cfg))
    handler = AlertHandler(cfg)

    def results() -> dict[str, Any]:
        out: dict[str, Any] = {"scored": handler.scored, "replays_skipped": handler.scorer.replays,
                               "alerts_published": len(handler.alerts), "forgotten": handler.forgotten}
        if args.labels:
            from clickvec.eventfile import read_table
            from clickvec.stream.consumers.alerts_eval import evaluate_alerts

            out["evaluation"] = evaluate_alerts(handler.alerts, read_table(args.labels))
        return out

    config = {**loop.describe(), **asdict(cfg)}
    return run_command("clickvec alerts", loop, handler, args.summary, config, results)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
