"""`clickvec run`: the whole pipeline in one command.

  clickvec run                       # local broker, synthetic users, train, export, stream
  clickvec run --quick --duration 60 # tiny model, one minute of traffic
  clickvec run --brokers HOST:PORT --data events.parquet

Stages: start the local Kafka broker (unless --brokers), write the events into the
workdir (synthetic, or --data), train a small encoder and export its bundle (skipped
when the workdir already holds a build of the same config), create the topics, start
`clickvec stream`, `clickvec alerts` and `clickvec recommend` as child processes (logs
in WORKDIR/logs), replay the events into the click topic at --rate with a few malformed
messages mixed in, and show what happens. Ctrl-C, SIGTERM or --duration end it: the
producer stops, the pipeline drains (when events still wait for their vectors), the
children get SIGTERM, the broker (if started here) stops, and WORKDIR/run_summary.{json,md}
record the figures.

Event times are the data's own (the model's gap features and the alert windows depend
on them), so latency is measured independently of event time: from the moment an event
was produced (its Kafka CreateTime) to the moment its vector reached this process's
consumer of the vector topic.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from clickvec.errors import ClickvecError
from clickvec.kafka import KafkaConnection, add_kafka_arguments

TOPICS = {"in": "clicks", "out": "user-vectors", "dlq": "clicks-dlq", "alerts": "alerts",
          "recs": "recommendations"}
QUICK_USERS = 800
DEFAULT_USERS = 3000
HOLDOUT_FRACTION = 0.2  # users never seen by training (their events still stream live)


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


def _parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(prog="clickvec run", description=doc.split("\n\n")[0],
                                epilog="\n\n".join(doc.split("\n\n")[1:3]),
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
    p.add_argument("--quick", action="store_true",
                   help="tiny model, fewer users: the shortest build (a first look, tests)")
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
    return p


def parse_args(argv: list[str]) -> RunConfig:
    p = _parser()
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
