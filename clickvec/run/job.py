"""The `clickvec run` job: build, start the pipeline, stream, drain, stop, summarise."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clickvec.devtools.proc import free_port
from clickvec.run.build import Build, build, training_warnings
from clickvec.run.children import Component, stop_all, wait_group_members, wait_worker_ready
from clickvec.run.config import TOPICS, RunConfig, RunError
from clickvec.run.lookup import LiveLookup
from clickvec.run.measure import Meter, waiting_for_vectors
from clickvec.run.observer import Observer
from clickvec.run.summary import figures, write_summary
from clickvec.run.traffic import LiveProducer, base_user
from clickvec.run.view import Screen, Snapshot

log = logging.getLogger(__name__)

DRAIN_QUIET_S = 3.0  # after the worker caught up: time for the consumers' last outputs
DRAIN_STALL_S = 15.0  # no progress at all for this long: stop waiting


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
        self.bootstrap: str | None = cfg.brokers
        self.topics: dict[str, str] = {}
        self.conf: dict[str, Any] = {}
        self.b: Build | None = None
        self.children: dict[str, Component] = {}
        self.producer: LiveProducer | None = None
        self.observer: Observer | None = None
        self.meter = Meter()
        self.watched: list[str] = []
        self.t_stream = 0.0
        self.t_stream_end = 0.0
        self.drained = False  # whether the drain waited (False: nothing was pending)
        self.lookup = LiveLookup(self.work, self.logs)

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
            if not self.t_stream:  # still starting (broker, build, children): nothing to drain
                raise KeyboardInterrupt(self.stop_reason)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    # -- run
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.logs.mkdir(parents=True, exist_ok=True)
        self._install_signals()
        log.info("clickvec run %s: %s", self.run_id, json.dumps(cfg.describe()))
        t0 = time.monotonic()
        summary: dict[str, Any] = {"run_id": self.run_id, "started_at": time.time(), "config": cfg.describe()}
        try:
            self.b = self._build_while_broker_starts()
            summary["build"] = {"reused": self.b.reused, "seconds": self.b.seconds}
            for w in training_warnings(self.b.training):
                log.warning("%s", w)
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
                    self._finish(summary, self.stop_reason or "error")
        return self._finish(summary, self.stop_reason or "duration")

    def _finish(self, summary: dict[str, Any], stopped_by: str) -> dict[str, Any]:
        summary.update(figures(self))
        summary["ended_at"] = time.time()
        summary["stopped_by"] = stopped_by
        if "error" in summary and "paths" in summary:
            summary["paths"].update(summary_json=str(self.work / "run_summary.failed.json"),
                                    summary_md=str(self.work / "run_summary.failed.md"))
        path = write_summary(self.work, summary)
        if "error" in summary:
            log.warning("this run failed: its summary is %s (the last good run's is kept)", path)
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
        assert b is not None and self.bootstrap is not None
        sfx = cfg.topic_suffix or ("-" + self.run_id if cfg.brokers is not None else "")
        t = self.topics = {k: v + sfx for k, v in TOPICS.items()}
        conn = dataclasses.replace(cfg.connection, brokers=self.bootstrap)
        self.conf = conn.client_config()
        for name in t.values():
            conn.ensure_topic(name, cfg.partitions)
        kafka_args, env = conn.flags(), conn.child_env()
        state_dir = self.work / "state"
        shutil.rmtree(state_dir, ignore_errors=True)
        self.meter.worker_port = free_port()
        self.children["stream"] = Component("stream", [
            "stream", "--model", str(b.bundle), *kafka_args, "--in", t["in"], "--out", t["out"],
            "--dlq", t["dlq"], "--group", f"clickvec-run-{self.run_id}", "--state-dir", str(state_dir),
            "--web-port", str(self.meter.worker_port)], self.logs / "stream.log", env).start()
        groups: list[str] = []
        for name, args in (("alerts", ["--out", t["alerts"]]),
                           ("recommend", ["--out", t["recs"], "--model", str(b.bundle), "--k", str(cfg.k)])):
            group = f"clickvec-run-{name}-{self.run_id}"
            self.children[name] = Component(name, [
                name, *kafka_args, "--in", t["out"], *args, "--group", group,
                "--summary", str(self.work / f"{name}_summary.json")], self.logs / f"{name}.log", env).start()
            groups.append(group)
        group = f"clickvec-run-serve-redis-{self.run_id}"
        if (serve := self.lookup.start(kafka_args, env, t["out"], group)) is not None:
            self.children["serve-redis"] = serve
            groups.append(group)
        self.observer = Observer(self.conf, {k: t[k] for k in ("out", "dlq", "alerts", "recs")},
                                 f"clickvec-run-view-{self.run_id}", t["in"])
        self.observer.start()
        log.info("waiting for the stream worker (log %s)", self.logs / "stream.log")
        wait_worker_ready(self.children["stream"], self.meter.worker_port)
        wait_group_members(self.conf, groups, [c for n, c in self.children.items() if n != "stream"])
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
                if self.children["stream"].check() != "running":
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
        they make progress. Nothing waiting for a vector: no wait at all (a second
        Ctrl-C / SIGTERM also skips it)."""
        obs, prod = self.observer, self.producer
        assert prod is not None and obs is not None
        self._tick()
        if waiting_for_vectors(obs, prod) == 0:
            log.info("nothing waits for a vector: no drain")
            return
        self.drained = True
        # Stopped by hand: done once the worker caught up; at the end of --duration the
        # consumers also get time for their last outputs.
        quiet_s = 0.0 if self.stop_reason in ("SIGINT", "SIGTERM") else DRAIN_QUIET_S
        screen = Screen(live=self.cfg.dashboard, every=2.0)
        deadline = time.monotonic() + timeout
        last, last_change = None, time.monotonic()
        while time.monotonic() < deadline and not self.skip_drain.is_set():
            self._tick()
            with obs.lock:
                now = (obs.counts["out"], obs.counts["dlq"], obs.counts["alerts"], obs.counts["recs"])
            if now != last:
                last, last_change = now, time.monotonic()
            quiet = time.monotonic() - last_change
            if waiting_for_vectors(obs, prod) == 0 and quiet >= quiet_s:
                return
            if quiet > DRAIN_STALL_S:
                log.warning("the pipeline stopped making progress while draining")
                return
            if self.children["stream"].check() != "running":
                return
            screen.show(self.snapshot("draining"))
            time.sleep(1.0)
        if not self.skip_drain.is_set():
            log.warning("drain timed out after %.0f s", timeout)

    def _shutdown(self) -> None:
        t0 = time.monotonic()
        stop_all([c for n in ("serve-redis", "recommend", "alerts", "stream")
                  if (c := self.children.get(n)) is not None])
        self.lookup.stop()
        if self.children:
            log.info("pipeline stopped in %.1f s", time.monotonic() - t0)
        if self.observer is not None and self.observer.is_alive():
            t0 = time.monotonic()
            self.observer.finish()
            self._tick()
            log.info("read every topic to its end in %.1f s", time.monotonic() - t0)
        if self.producer is not None and self.producer.is_alive():
            self.producer.stop()
            self.producer.join(30)
        if self.broker is not None:
            log.info("stopping the local Kafka broker")
            self.broker.stop()

    # -- measurements
    def _tick(self) -> None:
        if self.observer is not None and self.producer is not None:
            self.meter.tick(self.observer, self.producer)

    def snapshot(self, phase: str) -> Snapshot:
        obs, prod, b = self.observer, self.producer, self.b
        assert obs is not None and prod is not None and b is not None
        s = Snapshot(phase=phase, brokers=self.bootstrap or "", model_id=b.model_id,
                     duration_s=self.cfg.duration, workdir=str(self.work),
                     warnings=training_warnings(b.training))
        s.elapsed_s = time.monotonic() - self.t_stream
        with prod.lock:
            s.produced, s.malformed = prod.delivered, prod.delivered_bad
        s.in_rate, s.out_rate, s.worker_in_rate = self.meter.rates_now()
        s.waiting = waiting_for_vectors(obs, prod)
        s.latency_now = self.meter.recent()
        s.latency_all = self.meter.latency.summary()
        with obs.lock:
            s.vectors = obs.counts["out"]
            s.dead_letters = dict(obs.dead)
            s.alerts, s.recommendations = obs.counts["alerts"], obs.counts["recs"]
            s.latest_alerts = list(obs.latest_alerts)
            s.latest_recommendation = obs.latest_rec
            self._users(s, obs, b.labels)
        s.lookup = self.lookup.sample(self.watched[0] if self.watched else None)
        s.lookup_off = self.lookup.unavailable
        s.components = {name: c.check() if c.status == "running" else c.status
                        for name, c in self.children.items()}
        return s

    def _users(self, s: Snapshot, obs: Observer, labels: dict[str, str]) -> None:
        """The most surprising users now and a few busy users to watch (holds obs.lock)."""
        now = time.monotonic()
        for u in [u for u, v in obs.last.items() if now - v[0] > 60]:  # forget idle users
            obs.last.pop(u, None)
            obs.surprise.pop(u, None)
        recent = [(sum(q) / len(q), u) for u, q in obs.surprise.items()
                  if u in obs.last and now - obs.last[u][0] < 15 and len(q) == q.maxlen]
        recent.sort(reverse=True)
        s.top_surprise = [(u, sc, obs.last[u][1], labels.get(base_user(u), "")) for sc, u in recent[:5]]
        self.watched = [u for u in self.watched if u in obs.last and now - obs.last[u][0] < 20]
        if len(self.watched) < 3:
            busiest = sorted((v[1], u) for u, v in obs.last.items() if now - v[0] < 5 and u not in self.watched)
            self.watched += [u for _, u in busiest[::-1][: 3 - len(self.watched)]]
        s.watched = [(u, obs.last[u][1], obs.last[u][2], obs.last[u][3]) for u in self.watched]
