"""The one Kafka connection object every clickvec command uses.

`KafkaConnection` is built from flags (`add_kafka_arguments` + `KafkaConnection.from_args`)
or from the worker's resolved config, and turns into everything a client needs: the
librdkafka config (`client_config`), Faust's credentials (`faust_credentials`), and
topic creation (`ensure_topic`). Security settings are derived in one place, so every
command connects the same way with the same flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from clickvec.errors import ClickvecError

log = logging.getLogger(__name__)

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI")
PASSWORD_ENV = "CLICKVEC_SASL_PASSWORD"
# librdkafka's "reached the end of a partition" event code (confluent_kafka exposes it
# only as KafkaError._PARTITION_EOF).
PARTITION_EOF = -191


def replication_defaults(brokers: int) -> tuple[int, dict[str, str]]:
    """(replication factor, topic config) clickvec creates its topics with on a cluster
    of `brokers`: min(3, brokers) replicas, and `min.insync.replicas` 2 when there are 3
    or more, so an acknowledged write (acks=all) is on two brokers and losing any one
    loses nothing and stops no writer; 1 on smaller clusters, where 2 would stop every
    write while one broker is down."""
    replicas = max(1, min(3, brokers))
    return replicas, {"min.insync.replicas": "2" if replicas >= 3 else "1"}


class TopicError(ClickvecError):
    """A topic that could not be created or looked up. Action: check that the brokers are
    reachable and that this principal may create topics, or create the topic yourself."""


@dataclass(frozen=True)
class KafkaConnection:
    """Where the brokers are and how to authenticate. Empty strings mean "not set":
    the protocol is then derived (SASL_* when a SASL user or mechanism is given, *_SSL when
    a CA file is), and the mechanism defaults to PLAIN when only a user is given."""

    brokers: str = "127.0.0.1:9092"
    security_protocol: str = ""
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_cafile: str = ""

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: dict[str, str] | None = None) -> KafkaConnection:
        """From the flags `add_kafka_arguments` adds (missing ones are skipped, so any
        namespace with a `brokers` attribute works); the password may come from the
        environment (CLICKVEC_SASL_PASSWORD) so it stays out of `ps`."""
        env = os.environ if env is None else env

        def flag(name: str) -> str:
            return str(getattr(args, name, None) or "")

        return cls(
            brokers=args.brokers,
            security_protocol=flag("security_protocol").upper(),
            sasl_mechanism=flag("sasl_mechanism").upper(),
            sasl_username=flag("sasl_username"),
            sasl_password=flag("sasl_password") or env.get(PASSWORD_ENV, ""),
            ssl_cafile=flag("ssl_cafile"),
        )

    @property
    def protocol(self) -> str:
        if self.security_protocol:
            return self.security_protocol.upper()
        if self.sasl_mechanism or self.sasl_username:
            return "SASL_SSL" if self.ssl_cafile else "SASL_PLAINTEXT"
        return "SSL" if self.ssl_cafile else ""

    @property
    def mechanism(self) -> str:
        if self.sasl_mechanism:
            return self.sasl_mechanism.upper()
        return "PLAIN" if self.sasl_username else ""

    def client_config(self, **extra: Any) -> dict[str, Any]:
        """librdkafka (confluent-kafka) settings, plus `extra` (e.g. `**{"group.id": g}`)."""
        conf: dict[str, Any] = {"bootstrap.servers": self.brokers}
        proto = self.protocol
        if proto:
            conf["security.protocol"] = proto
        if self.mechanism:
            conf["sasl.mechanism"] = self.mechanism
        if self.sasl_username:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password and proto.startswith("SASL"):
            conf["sasl.password"] = self.sasl_password
        if self.ssl_cafile:
            conf["ssl.ca.location"] = self.ssl_cafile
        conf.update(extra)
        return conf

    def flags(self) -> list[str]:
        """Command-line flags that rebuild this connection in a child process; the password
        is left out (pass `child_env()` to the child instead)."""
        out = ["--brokers", self.brokers]
        for name in ("security_protocol", "sasl_mechanism", "sasl_username", "ssl_cafile"):
            value = getattr(self, name)
            if value:
                out += ["--" + name.replace("_", "-"), value]
        return out

    def child_env(self) -> dict[str, str]:
        return {PASSWORD_ENV: self.sasl_password} if self.sasl_password else {}

    def redacted(self) -> dict[str, Any]:
        d = asdict(self)
        if d["sasl_password"]:
            d["sasl_password"] = "***"
        return d

    def faust_credentials(self) -> Any:
        """Faust's credentials object for this connection (None for plaintext)."""
        proto = self.protocol or "PLAINTEXT"
        if proto == "PLAINTEXT":
            return None
        import ssl

        import faust

        ctx = ssl.create_default_context(cafile=self.ssl_cafile or None) if "SSL" in proto else None
        if proto.startswith("SASL"):
            return faust.SASLCredentials(
                username=self.sasl_username, password=self.sasl_password,
                mechanism=self.mechanism or "PLAIN", ssl_context=ctx,
            )
        return faust.SSLCredentials(ctx)

    def ensure_topic(self, topic: str, partitions: int, *, replication_factor: int = -1,
                     config: dict[str, str] | None = None, timeout: float = 30.0) -> bool:
        """Create `topic` with `partitions` partitions unless it exists (a topic that exists
        with another count is left as it is, with a warning); True if this call created it.
        Returns once the brokers list the new topic with all its partitions.

        `replication_factor` -1 and no `min.insync.replicas` in `config`: the defaults of
        `replication_defaults` for the brokers the cluster lists."""
        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient(self.client_config())
        md = admin.list_topics(timeout=timeout)
        if topic in md.topics and md.topics[topic].error is None:
            have = len(md.topics[topic].partitions)
            if have != partitions:
                log.warning("topic %s exists with %d partitions (asked for %d); left as is",
                            topic, have, partitions)
            return False
        replicas, defaults = replication_defaults(len(md.brokers))
        if replication_factor <= 0:
            replication_factor = replicas
        else:
            defaults = replication_defaults(replication_factor)[1]
        new = NewTopic(topic, num_partitions=partitions, replication_factor=replication_factor,
                       config={**defaults, **(config or {})})
        try:
            admin.create_topics([new], operation_timeout=timeout)[topic].result(timeout)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise TopicError(f"could not create topic {topic!r} on {self.brokers}: {e}") from None
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = admin.list_topics(topic=topic, timeout=5).topics.get(topic)
            if t is not None and t.error is None and len(t.partitions) == partitions:
                return True
            time.sleep(0.1)
        raise TopicError(f"topic {topic!r} was created but its {partitions} partitions did not appear "
                         f"within {timeout:.0f}s")


def add_kafka_arguments(parser: argparse.ArgumentParser, brokers_required: bool = False) -> None:
    """`--brokers` and the standard client security flags, read by `KafkaConnection.from_args`."""
    g = parser.add_argument_group("Kafka connection")
    g.add_argument(
        "--brokers",
        required=brokers_required,
        default=None if brokers_required else os.environ.get("CLICKVEC_BROKERS", "127.0.0.1:9092"),
        help="bootstrap servers HOST:PORT[,HOST:PORT] (env CLICKVEC_BROKERS; default %(default)s)",
    )
    g.add_argument("--security-protocol", choices=SECURITY_PROTOCOLS, type=str.upper, default=None,
                   help="default: derived (SASL_* with a SASL user, *_SSL with a CA file, else PLAINTEXT)")
    g.add_argument("--sasl-mechanism", choices=SASL_MECHANISMS, type=str.upper, default=None,
                   help="default: PLAIN when --sasl-username is given")
    g.add_argument("--sasl-username", default=None, help="SASL user (default: none)")
    g.add_argument(
        "--sasl-password",
        default=None,
        help=f"SASL password (prefer env {PASSWORD_ENV}: flags show up in `ps`)",
    )
    g.add_argument("--ssl-cafile", default=None, help="CA bundle (PEM) to verify the brokers (default: none)")


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
