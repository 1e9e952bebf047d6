"""Soak benchmark (issue 14; not a test): N minutes of mixed traffic through one
`clickvec stream` worker that is SIGKILLed at random instants and restarted, with one
broker bounce (stop, then start on the same dir: same ports, same data) half way.

Traffic: valid click events from `--users` users at `--rate` events/s (some with items
outside the catalogue), and a `--fuzz` fraction of malformed messages (random bytes,
truncated or mistyped JSON, missing fields, and every `--big-every` seconds one of about
800 KB) keyed by users of their own, so one that parsed by mistake could not touch a real
user's state. The producer is idempotent; what it reports delivered is the ledger.

Checked as it runs (benchmarks/soak_check.py), memory bounded by one round of vectors:
every vector against the offline encoder on the user's delivered events (max abs diff
<= 1e-5). Reported: lost (an event without its vector), applied twice (a vector past
the user's last event or different from the offline encoder), exact users, same-seq
duplicates, worker restarts (SIGKILLs) and unplanned exits, dead letters (distinct by
source offset, and repeats) against the malformed messages delivered.

    nice -n 10 .venv/bin/python -m benchmarks.soak --minutes 30      # writes results/soak.json
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/soak.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common
from benchmarks.soak_check import DeadLetterCount, Ledger, Verifier
from clickvec.contract.events import EVENT_TYPES
from clickvec.devtools.proc import clickvec_command, free_port
from clickvec.kafka import produce_waiting
from clickvec.logsetup import configure

log = logging.getLogger("soak")


class Traffic:
    """Valid events and fuzz, paced; the ledger records what the brokers acknowledged."""

    def __init__(self, bootstrap: str, topic: str, ledger: Ledger, users: int, n_items: int, fuzz: float,
                 seed: int) -> None:
        from confluent_kafka import Producer

        self.p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True,
                           "message.max.bytes": 1_000_000, "log_level": 0})
        self.topic, self.ledger, self.users, self.n_items, self.fuzz = topic, ledger, users, n_items, fuzz
        self.rng = random.Random(seed)
        self.sent = self.fuzz_delivered = self.failed = 0

    def _valid(self) -> None:
        r = self.rng
        user = f"u{r.randrange(self.users)}"
        item = f"item-{r.randrange(self.n_items)}" if r.random() > 0.02 else f"new-item-{r.randrange(10**6)}"
        etype, ts = r.choice(EVENT_TYPES), int(time.time() * 1000)
        value = json.dumps({"user_id": user, "item_id": item, "event_type": etype, "ts": ts}).encode()

        def delivered(err: Any, _msg: Any) -> None:
            if err is None:
                self.ledger.add(user, item, etype, ts)
            else:
                self.failed += 1

        produce_waiting(self.p, self.topic, user.encode(), value, delivered)

    def _malformed(self, big: bool = False) -> None:
        r = self.rng
        uid = f"fuzz-{r.randrange(1000)}"
        good = json.dumps({"user_id": uid, "item_id": "item-1", "event_type": "view", "ts": 1_767_225_600_000})
        if big:
            value = b"{" + bytes(r.randrange(32, 127) for _ in range(800_000))
        else:
            kind = r.randrange(5)
            value = [
                lambda: r.randbytes(r.randrange(1, 300)),
                lambda: good[: r.randrange(1, len(good) - 1)].encode(),
                lambda: good.replace('"ts": 1767225600000', '"ts": "soon"').encode(),
                lambda: json.dumps({"user_id": uid, "event_type": "view"}).encode(),
                lambda: good.replace('"view"', '"' + "x" * r.randrange(300, 3000) + '"').replace(
                    '"item_id": "item-1"', '"item_id": 7').encode(),
            ][kind]()

        def delivered(err: Any, _msg: Any) -> None:
            if err is None:
                self.fuzz_delivered += 1
            else:
                self.failed += 1

        produce_waiting(self.p, self.topic, uid.encode(), value, delivered)

    def send_due(self, n: int, big: bool = False) -> None:
        for _ in range(n):
            if self.rng.random() < self.fuzz:
                self._malformed()
            else:
                self._valid()
            self.sent += 1
        if big:
            self._malformed(big=True)
            self.sent += 1
        self.p.poll(0)


class Worker:
    """The worker process: SIGKILLed and restarted on the same state dir and group."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.child: common.Child | None = None
        self.kills = 0
        self.exits: list[int | None] = []  # exit codes of workers that ended by themselves

    def start(self) -> None:
        c = self.cfg
        cmd = clickvec_command("stream", "--model", str(c["bundle"]), "--brokers", c["bootstrap"], "--in", c["in"],
                               "--out", c["out"], "--dlq", c["dlq"], "--group", c["group"],
                               "--state-dir", str(c["state"]), "--web-port", str(free_port()),
                               "--session-timeout", "10", "--loglevel", "warning")
        self.child = common.Child(cmd, c["log"]).start()

    def kill_and_restart(self) -> None:
        assert self.child is not None
        self.child.kill()
        self.kills += 1
        self.start()

    def check(self) -> None:
        """A worker that exited by itself (exit 70: a batch it could not complete) is
        restarted and counted."""
        if self.child is not None and not self.child.alive():
            log.warning("worker exited by itself (%s); restarting", self.child.returncode)
            self.exits.append(self.child.returncode)
            self.start()


class _Reader:
    """A reader of `topic` from its start that hands each record on once: a group member
    rejoins after the broker bounce and, with no committed offsets, reads the topic again
    from the start; records at or below the last offset already read in their partition
    are skipped, so only the worker's own repeats (new offsets) count as duplicates."""

    def __init__(self, bootstrap: str, topic: str, sink: Any) -> None:
        from confluent_kafka import Consumer

        self.c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"soak-{uuid.uuid4().hex}",
                           "auto.offset.reset": "earliest", "enable.auto.commit": False, "log_level": 0,
                           "fetch.max.bytes": 4_000_000})
        self.c.subscribe([topic])
        self.sink = sink
        self.last: dict[int, int] = {}
        self.reread = 0

    def drain(self, timeout: float) -> int:
        n = 0
        for m in self.c.consume(num_messages=5000, timeout=timeout):
            if m.error() is not None:
                continue
            if m.offset() <= self.last.get(m.partition(), -1):
                self.reread += 1
                continue
            self.last[m.partition()] = m.offset()
            self.sink(m.value())
            n += 1
        return n

    def close(self) -> None:
        self.c.close()


class Soak:
    """The run: traffic, faults and checking in one loop (the broker must be started and
    restarted from this thread: it is tied to the thread that starts it)."""

    def __init__(self, a: argparse.Namespace, work: Path) -> None:
        from clickvec.bundle.reader import load_bundle
        from clickvec.devtools import broker as broker_mod

        self.a, self.work, self.broker_mod = a, work, broker_mod
        self.broker = broker_mod.start(work / "kafka", reset=True)  # this run's own broker
        bootstrap = self.broker.bootstrap
        bundle_path = common.make_bundle(work)
        self.bundle = load_bundle(bundle_path, providers="cpu", warmup=False)
        in_topic = common.create_topic(bootstrap, "soak-clicks", a.partitions)
        self.ledger = Ledger(self.bundle.spec)
        self.verifier = Verifier(self.bundle, self.ledger)
        self.dead = DeadLetterCount()
        self.traffic = Traffic(bootstrap, in_topic, self.ledger, a.users, common.N_ITEMS, a.fuzz, a.seed)
        self.worker = Worker({"bundle": bundle_path, "bootstrap": bootstrap, "in": in_topic,
                              "out": in_topic + "-vectors", "dlq": in_topic + "-dlq", "group": "soak",
                              "state": work / "state", "log": work / "worker.log"})
        self.worker.start()
        self.rng = random.Random(a.seed + 1)
        self.readers: list[_Reader] = []
        self.bounce: dict[str, Any] = {}
        self.worker_rss_mb = 0.0
        self.timeline: list[dict[str, Any]] = []

    def _read(self, timeout: float = 0.05) -> None:
        if not self.readers:  # once the worker has created its output topics
            from confluent_kafka.admin import AdminClient

            out, dlq = self.worker.cfg["out"], self.worker.cfg["dlq"]
            try:
                md = AdminClient({"bootstrap.servers": self.broker.bootstrap, "log_level": 0}).list_topics(timeout=2)
            except Exception:  # noqa: BLE001 - e.g. the broker is down: next time
                time.sleep(timeout)
                return
            if out not in md.topics or dlq not in md.topics:
                time.sleep(timeout)
                return
            self.readers = [_Reader(self.broker.bootstrap, out, self.verifier.add),
                            _Reader(self.broker.bootstrap, dlq, self.dead.add)]
        for r in self.readers:
            r.drain(timeout)

    def _faults(self, now: float, t0: float, next_kill: float) -> float:
        """A SIGKILL when due (not while the broker is down); the broker bounce half way."""
        a = self.a
        if not self.bounce and now - t0 >= a.minutes * 30:
            log.info("broker bounce: stop")
            self.broker.stop()
            self.bounce = {"stopped_at_s": round(now - t0, 1), "down_until": now + a.bounce_down}
        elif self.bounce.get("down_until") and now >= self.bounce["down_until"]:
            t = time.monotonic()
            self.broker = self.broker_mod.start(self.work / "kafka")  # same dir: same ports, same data
            self.bounce.update(down_until=None, restart_s=round(time.monotonic() - t, 1),
                               same_bootstrap=self.broker.bootstrap == self.worker.cfg["bootstrap"])
            log.info("broker bounce: up again in %.1f s", self.bounce["restart_s"])
        elif now >= next_kill and not self.bounce.get("down_until"):
            log.info("SIGKILL the worker (kill %d)", self.worker.kills + 1)
            self.worker.kill_and_restart()
            return now + self.rng.uniform(0.5, 1.5) * a.kill_mean
        return next_kill

    def _sample(self, now: float, t0: float) -> None:
        if self.worker.child is not None:
            rss = self.worker.child.peak_rss_mb()
            if rss == rss:  # not NaN
                self.worker_rss_mb = max(self.worker_rss_mb, rss)
        self.verifier.round()
        row = {"t_s": round(now - t0), "sent": self.traffic.sent, "delivered": self.ledger.total,
               "vectors": self.verifier.vectors, "checked": self.verifier.checked,
               "wrong": len(self.verifier.wrong), "kills": self.worker.kills,
               "dead_letters": len(self.dead.sources), "soak_rss_mb": _rss_mb()}
        self.timeline.append(row)
        log.info("%s", row)

    def run(self) -> dict[str, Any]:
        a = self.a
        t0 = time.monotonic()
        end = t0 + a.minutes * 60
        next_kill = t0 + self.rng.uniform(0.5, 1.5) * a.kill_mean
        next_big, next_round = t0 + a.big_every, t0 + a.round_s
        paced = 0
        while (now := time.monotonic()) < end:
            due = int((now - t0) * a.rate) - paced
            big = now >= next_big
            next_big += a.big_every if big else 0
            self.traffic.send_due(due, big)
            paced += due
            self._read()
            next_kill = self._faults(now, t0, next_kill)
            self.worker.check()
            if now >= next_round:
                self._sample(now, t0)
                next_round = now + a.round_s
        traffic_s = time.monotonic() - t0
        drained = self._drain_all()
        self.verifier.round(final=True)
        return self._result(traffic_s, drained)

    def _drain_all(self) -> float:
        """Traffic stopped: wait until every delivered event's vector and every malformed
        message's dead letter arrived (or --drain-timeout). Returns the seconds waited."""
        t = time.monotonic()
        left = self.traffic.p.flush(120)
        if left:
            log.warning("%d messages still queued after 120 s", left)
        deadline = t + self.a.drain_timeout
        while time.monotonic() < deadline:
            self._read(0.2)
            self.worker.check()
            if self.verifier.complete() and len(self.dead.sources) >= self.traffic.fuzz_delivered:
                break
        waited = time.monotonic() - t
        self._read(1.0)  # stragglers: duplicates still count
        return waited

    def _result(self, traffic_s: float, drained_s: float) -> dict[str, Any]:
        v = self.verifier.summary()
        return {
            "traffic_s": round(traffic_s, 1), "drain_s": round(drained_s, 1),
            "messages_sent": self.traffic.sent, "valid_delivered": self.ledger.total,
            "malformed_delivered": self.traffic.fuzz_delivered, "delivery_failures": self.traffic.failed,
            "lost": v["lost"], "applied_twice": v["applied_twice"], "exact_users": v["exact_users"],
            "users": v["users"], "all_exact": v["lost"] == 0 and v["applied_twice"] == 0 and v["exact_users"] == v[
                "users"],
            "worker_restarts": self.worker.kills, "worker_unplanned_exits": len(self.worker.exits),
            "worker_exit_codes": self.worker.exits,
            "broker_bounce": self.bounce, **self.dead.summary(), "verification": v,
            "worker_peak_rss_mb": self.worker_rss_mb, "soak_peak_rss_mb": _rss_mb(),
            "reader_rereads_skipped": sum(r.reread for r in self.readers), "timeline": self.timeline,
        }

    def close(self) -> None:
        for r in self.readers:
            r.close()
        if self.worker.child is not None:
            self.worker.child.stop(60)
        self.broker.stop()


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="minutes of traffic (default %(default)s)")
    p.add_argument("--rate", type=float, default=300.0, help="messages per second (default %(default)s)")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--fuzz", type=float, default=0.02, help="fraction of malformed messages (default %(default)s)")
    p.add_argument("--big-every", type=float, default=120.0, help="one ~800 KB malformed message every S seconds")
    p.add_argument("--kill-mean", type=float, default=60.0,
                   help="mean seconds between SIGKILLs, each drawn from 0.5x-1.5x (default %(default)s)")
    p.add_argument("--bounce-down", type=float, default=15.0, help="seconds the broker stays down half way")
    p.add_argument("--round-s", type=float, default=20.0, help="seconds between checking rounds")
    p.add_argument("--drain-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=common.RESULTS / "soak.json")
    a = p.parse_args(argv)
    configure(logging.INFO)
    load_before = list(__import__("os").getloadavg())
    t_begin = time.time()
    with tempfile.TemporaryDirectory(prefix="clickvec-soak-") as tmp:
        soak = Soak(a, Path(tmp))
        try:
            result = soak.run()
        finally:
            worker_log = soak.worker.child.log_tail(40) if soak.worker.child else ""
            soak.close()
    res = {"benchmark": "soak", "what": __doc__.split("\n\n")[1].strip(), "config": vars(a) | {"out": str(a.out)},
           **result, "worker_log_tail": worker_log.splitlines()[-40:], "versions": common.versions(),
           "machine": {**common.machine_info(), "load_average_before": load_before}, "wall_s": time.time() - t_begin,
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    keys = ("lost", "applied_twice", "exact_users", "users", "all_exact", "worker_restarts",
            "worker_unplanned_exits", "dead_letters", "dead_letter_repeats", "malformed_delivered",
            "valid_delivered", "broker_bounce")
    print(json.dumps({k: res[k] for k in keys}, indent=1, default=str))


if __name__ == "__main__":
    main()
