"""Kafka client flags shared by every clickvec command that talks to a broker.

`add_kafka_arguments(parser)` adds `--brokers` and the standard security flags;
`kafka_client_config(args)` turns them into a librdkafka (confluent-kafka) config dict.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI")


def add_kafka_arguments(parser: argparse.ArgumentParser, brokers_required: bool = False) -> None:
    g = parser.add_argument_group("Kafka connection")
    g.add_argument(
        "--brokers",
        required=brokers_required,
        default=None if brokers_required else os.environ.get("CLICKVEC_BROKERS", "127.0.0.1:9092"),
        help="bootstrap servers HOST:PORT[,HOST:PORT] (env CLICKVEC_BROKERS; default %(default)s)",
    )
    g.add_argument("--security-protocol", choices=SECURITY_PROTOCOLS, type=str.upper, default=None)
    g.add_argument("--sasl-mechanism", choices=SASL_MECHANISMS, type=str.upper, default=None)
    g.add_argument("--sasl-username", default=None)
    g.add_argument(
        "--sasl-password",
        default=None,
        help="SASL password (prefer env CLICKVEC_SASL_PASSWORD: flags show up in `ps`)",
    )
    g.add_argument("--ssl-cafile", default=None, help="CA bundle (PEM) to verify the brokers")


def kafka_client_config(args: argparse.Namespace) -> dict[str, Any]:
    """librdkafka settings for the connection flags in `args` (missing flags are skipped,
    so any namespace with a `brokers` attribute works)."""
    conf: dict[str, Any] = {"bootstrap.servers": args.brokers}
    proto = getattr(args, "security_protocol", None)
    mech = getattr(args, "sasl_mechanism", None)
    user = getattr(args, "sasl_username", None)
    password = getattr(args, "sasl_password", None) or os.environ.get("CLICKVEC_SASL_PASSWORD")
    cafile = getattr(args, "ssl_cafile", None)
    if proto is None and (mech or user):
        proto = "SASL_SSL" if cafile else "SASL_PLAINTEXT"
    if proto:
        conf["security.protocol"] = proto
    if mech:
        conf["sasl.mechanism"] = mech
    elif user:
        conf["sasl.mechanism"] = "PLAIN"
    if user:
        conf["sasl.username"] = user
    if password and str(proto).startswith("SASL"):
        conf["sasl.password"] = password
    if cafile:
        conf["ssl.ca.location"] = cafile
    return conf


def produce_waiting(producer: Any, topic: str, key: bytes | None, value: bytes | None,
                    on_delivery: Any = None, wait: float = 0.05, partition: int | None = None) -> None:
    """`producer.produce`, waiting for deliveries to drain while its local queue is full.
    `partition` None: the producer's partitioner picks it from the key."""
    extra = {} if partition is None else {"partition": partition}
    while True:
        try:
            producer.produce(topic, value=value, key=key, on_delivery=on_delivery, **extra)
            return
        except BufferError:
            producer.poll(wait)
