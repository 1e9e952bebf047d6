"""`clickvec forget`: erase users by writing tombstones to the input topic.

  clickvec forget --brokers HOST:PORT --topic clicks USER [USER ...]
  clickvec forget --brokers HOST:PORT --file users.txt        # one user id a line, - for stdin

A tombstone is a message with the user id as its key and a null value. The stream worker
that reads it deletes the user's state from RocksDB and the changelog and publishes a
tombstone (key = user id, value null) on the vector topic and the latest-vector topic;
`clickvec alerts` and `clickvec recommend` drop the user when they read it; the user's
next event starts from a fresh state (stream/worker/engine.py has the details).

The worker keeps a user's state on the input partition its events arrive on. By default
a tombstone goes to every partition of the topic, so the user is found whichever
partitioner the event producers use (the partitions that hold nothing for the user
ignore it); `--partitioner consistent_random` (librdkafka's default, what `clickvec
produce` uses) or `murmur2_random` (the Java clients') send one tombstone to the key's
partition instead.

The input topic itself still holds the user's events until its retention removes them:
resetting the worker's group to earlier offsets would apply them again.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from clickvec.contract.topics import DEFAULT_IN_TOPIC
from clickvec.errors import ClickvecError
from clickvec.kafka import KafkaConnection, add_kafka_arguments, produce_waiting

PARTITIONERS = ("all", "consistent_random", "murmur2_random")


class ForgetError(ClickvecError):
    """Tombstones could not be written. Action: check the brokers, the topic name and
    this principal's write permission on it; nothing is erased until the worker reads them."""


def read_users(names: Iterable[str], file: str | None) -> list[str]:
    """User ids from the arguments and the file (one a line, blank lines skipped), in order,
    each once."""
    users = list(names)
    if file:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
        users += [line.strip() for line in text.splitlines() if line.strip()]
    return list(dict.fromkeys(users))


def forget(conn: KafkaConnection, topic: str, users: list[str], partitioner: str = "all",
           timeout: float = 30.0) -> int:
    """Write the users' tombstones to `topic` and wait until the brokers hold them;
    returns how many tombstones were written."""
    from confluent_kafka import Producer

    from clickvec.stream.worker.config import StreamConfig
    from clickvec.stream.worker.probe import cluster_metadata

    cfg = StreamConfig(brokers=conn.brokers, security_protocol=conn.security_protocol,
                       sasl_mechanism=conn.sasl_mechanism, sasl_username=conn.sasl_username,
                       sasl_password=conn.sasl_password, ssl_cafile=conn.ssl_cafile)
    md = cluster_metadata(cfg)
    meta = md.topics.get(topic)
    if meta is None or meta.error is not None:
        raise ForgetError(f"topic {topic!r} does not exist on {conn.brokers}")
    partitions = sorted(meta.partitions)
    extra = {} if partitioner == "all" else {"partitioner": partitioner}
    producer = Producer(conn.client_config(**{"enable.idempotence": True, "acks": "all", "linger.ms": 5}, **extra))
    errors: list[str] = []

    def on_delivery(err: object, msg: object) -> None:
        if err is not None:
            errors.append(str(err))

    sent = 0
    for user in users:
        key = user.encode()
        for partition in partitions if partitioner == "all" else [None]:
            produce_waiting(producer, topic, key, None, on_delivery, partition=partition)
            sent += 1
    left = producer.flush(timeout)
    if errors or left:
        raise ForgetError(f"{len(errors) + left} of {sent} tombstones to {topic!r} not written: "
                          f"{errors[:3] or 'no acknowledgement in time'}")
    return sent


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clickvec forget", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_kafka_arguments(p)
    p.add_argument("users", nargs="*", help="user ids to forget")
    p.add_argument("--file", help="more user ids, one a line (- for stdin)")
    p.add_argument("--topic", default=DEFAULT_IN_TOPIC, help="the stream's input topic (default %(default)s)")
    p.add_argument("--partitioner", choices=PARTITIONERS, default="all",
                   help="all: a tombstone to every partition (default); else the producers' partitioner")
    args = p.parse_args(argv)
    try:
        users = read_users(args.users, args.file)
        if not users:
            raise ForgetError("no user ids given (as arguments or with --file)")
        sent = forget(KafkaConnection.from_args(args), args.topic, users, args.partitioner)
    except (ClickvecError, OSError) as e:
        print(f"clickvec forget: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"topic": args.topic, "users": len(users), "tombstones": sent}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
