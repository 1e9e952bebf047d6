"""`clickvec produce`: send click events (from a file or the synthetic generator) to Kafka.

Key = user id (so one user's events stay in one partition, in order), value = the
event's contract JSON. The producer is idempotent, so retries never reorder or
duplicate a user's events within a partition.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from clickvec.contract.events import ClickEvent
from clickvec.contract.topics import DEFAULT_IN_TOPIC
from clickvec.errors import ClickvecError
from clickvec.kafka import KafkaConnection, add_kafka_arguments, produce_waiting
from clickvec.preflight import cluster_metadata, held_logs, require_topic

log = logging.getLogger(__name__)


class ProduceError(ClickvecError):
    """Events could not be delivered. Action: check the broker address, the topic
    and the security flags; the message names the first delivery error."""


class TokenBucket:
    """At most `rate` tokens per second on average, bursts of at most `burst`."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate / 20)
        self.tokens = self.burst
        self.t = time.monotonic()

    def take(self, n: float = 1.0) -> float:
        """Block until `n` tokens are available; return the seconds slept."""
        slept = 0.0
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
            self.t = now
            if self.tokens >= n:
                self.tokens -= n
                return slept
            wait = (n - self.tokens) / self.rate
            time.sleep(wait)
            slept += wait


def produce_records(
    records: Iterable[tuple[bytes | None, bytes]],
    bootstrap: str,
    topic: str,
    rate: float | None = None,
    extra_config: dict[str, Any] | None = None,
    total: int | None = None,
    progress: bool | None = False,
) -> int:
    """Send (key, value) pairs in order; return how many were acknowledged.
    Raises ProduceError if any message failed. `progress=None` shows a bar on a TTY."""
    from confluent_kafka import KafkaException, Producer
    from tqdm import tqdm

    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "linger.ms": 5,
        "enable.idempotence": True,  # retries keep per-partition order, no duplicates
        "compression.type": "lz4",
        "queue.buffering.max.messages": 200_000,
    }
    conf.update(extra_config or {})
    try:
        producer = Producer(conf)
    except KafkaException as e:
        raise ProduceError(f"bad producer config: {e}") from None
    delivered = 0
    errors: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        nonlocal delivered
        if err is None:
            delivered += 1
        elif len(errors) < 10:
            errors.append(f"{msg.topic()}[{msg.partition()}]: {err}")

    bucket = TokenBucket(rate) if rate else None
    bar = tqdm(
        total=total,
        unit="ev",
        disable=(not progress) if progress is not None else None,
        file=sys.stderr,
    )
    sent = 0
    try:
        for key, value in records:
            if bucket is not None:
                bucket.take()
            produce_waiting(producer, topic, key, value, on_delivery)
            sent += 1
            if sent % 1000 == 0:
                producer.poll(0)
                bar.update(1000)
                if errors:
                    break
        producer.poll(0)
        remaining = producer.flush(60)
        bar.update(sent % 1000)
    finally:
        bar.close()
    if errors or remaining:
        raise ProduceError(
            f"{sent - delivered} of {sent} events not delivered to {topic!r} at {bootstrap}"
            + (f"; first errors: {errors}" if errors else f"; {remaining} still queued after flush")
        )
    return delivered


def produce_events(
    events: Iterable[ClickEvent],
    bootstrap: str,
    topic: str,
    rate: float | None = None,
    extra_config: dict[str, Any] | None = None,
    progress: bool | None = False,
) -> int:
    """Send events keyed by user id, in iteration order; return the count acknowledged."""
    total = len(events) if hasattr(events, "__len__") else None  # type: ignore[arg-type]
    records = ((e.user_id.encode(), e.to_bytes()) for e in events)
    return produce_records(records, bootstrap, topic, rate, extra_config, total, progress)


def _load_events(args: argparse.Namespace) -> Iterator[ClickEvent] | list[ClickEvent]:
    if args.synthetic:
        from clickvec.devtools.synth import SynthConfig, generate_events

        return generate_events(SynthConfig(n_users=args.users, seed=args.seed))
    from clickvec.eventfile import iter_events

    return iter_events(args.file)


def _preflight(args: argparse.Namespace, conn: KafkaConnection) -> None:
    """Before any event is read or sent: the events file, the brokers (reachable,
    credentials, TLS: one line within seconds, not a minute of flush retries) and the
    topic, which must exist unless --partitions creates it (a broker that auto-creates
    topics would make it with its default partition count, silently)."""
    if args.file is not None and not args.file.is_file():
        raise ClickvecError(f"the events file {str(args.file)!r} (--file) does not exist")
    md = cluster_metadata(conn, debug=args.debug)
    if args.partitions:
        conn.ensure_topic(args.topic, args.partitions)
    else:
        require_topic(md, args.topic, conn.brokers, "pass --partitions N to create it")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clickvec produce", description=__doc__.split("\n\n")[0])
    add_kafka_arguments(p)
    p.add_argument("--topic", default=DEFAULT_IN_TOPIC, help="target topic (default %(default)s)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", type=Path, help="events file: .parquet, .jsonl or .csv")
    src.add_argument("--synthetic", action="store_true", help="generate events with clickvec.synth")
    p.add_argument("--users", type=int, default=1000, help="synthetic users (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="synthetic seed (default %(default)s)")
    p.add_argument(
        "--rate", type=float, default=None, help="events per second (default: as fast as possible)"
    )
    p.add_argument("--limit", type=int, default=None, help="send at most N events")
    p.add_argument(
        "--partitions", type=int, default=None, help="create the topic with N partitions if missing"
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="librdkafka's own log during the start-up check")
    args = p.parse_args(argv)

    conn = KafkaConnection.from_args(args)
    try:
        with held_logs(not args.debug):
            _preflight(args, conn)
    except (ClickvecError, OSError) as e:
        # A user's mistake (events file, brokers, credentials, CA file, topic): one line.
        print(f"clickvec produce: {e}", file=sys.stderr)
        return 2
    conf = conn.client_config()
    bootstrap = conf.pop("bootstrap.servers")
    try:
        events = _load_events(args)
        total = len(events) if isinstance(events, list) else None
        if args.limit is not None:
            events = itertools.islice(events, args.limit)
            total = min(total, args.limit) if total is not None else args.limit
        records = ((e.user_id.encode(), e.to_bytes()) for e in events)
        t0 = time.monotonic()
        n = produce_records(
            records,
            bootstrap,
            args.topic,
            args.rate,
            conf,
            total,
            progress=None if not args.no_progress else False,
        )
        dt = time.monotonic() - t0
    except (ClickvecError, OSError) as e:
        print(f"clickvec produce: {e}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "produced": n,
                "topic": args.topic,
                "seconds": round(dt, 3),
                "events_per_s": round(n / dt if dt else 0.0),
            }
        )
    )
    return 0


if __name__ == "__main__":
    from clickvec.logsetup import configure

    configure()
    sys.exit(main(sys.argv[1:]))
