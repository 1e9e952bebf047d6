"""Start-up checks every Kafka command runs before its real clients connect.

librdkafka and aiokafka clients given an unreachable broker, a wrong password or a TLS
mismatch retry for tens of seconds (a producer's flush, a consumer's poll: forever) and
bury the cause in hundreds of lines of client log. So each command first asks for the
cluster's metadata with one quiet librdkafka admin client, for a few seconds at most,
collecting the errors librdkafka reports on the way: the first one that names a cause
(authentication, TLS, connection) is the one line the command stops with. Then the topics
it needs are looked up in that metadata. While these checks run the command's own log is
held back (`held_logs`), so a failed check prints its one line and nothing else.

Used by `clickvec stream` (through stream/worker/probe.py), `produce`, `alerts`,
`recommend` and `run`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clickvec.errors import ClickvecError
from clickvec.kafka import KafkaConnection

# librdkafka's local error codes (confluent_kafka exposes them only as private names).
_AUTHENTICATION, _SSL, _INVALID_ARG, _UNKNOWN_PROTOCOL, _TRANSPORT, _RESOLVE = -169, -181, -186, -171, -195, -193
_SASL_AUTHENTICATION_FAILED = 58  # KafkaError.SASL_AUTHENTICATION_FAILED
# Errors after which asking again cannot help: stop at once.
_FINAL = frozenset({_AUTHENTICATION, _SSL, _SASL_AUTHENTICATION_FAILED, _INVALID_ARG, _UNKNOWN_PROTOCOL})


class ConnectionCheckError(ClickvecError):
    """The brokers could not be reached or refused this client. Action: check the
    addresses, the security protocol, the SASL credentials and the CA file named."""


class MissingTopicError(ClickvecError):
    """A topic the command reads does not exist. Action: create it, or start the command
    that creates it first (the message says which)."""


def _cause(errors: list[Any]) -> str:
    """The most telling of the errors librdkafka reported."""
    for codes in (_FINAL, {_TRANSPORT, _RESOLVE}):
        for e in errors:
            if e.code() in codes:
                return str(e.str())
    return str(errors[0].str()) if errors else "no answer"


def cluster_metadata(conn: KafkaConnection, timeout: float = 4.0, debug: bool = False) -> Any:
    """The cluster's metadata (confluent_kafka ClusterMetadata), or ConnectionCheckError
    within about `timeout` seconds naming the cause. `debug`: librdkafka's own log too."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    if conn.ssl_cafile and not Path(conn.ssl_cafile).is_file():
        raise ConnectionCheckError(f"the CA file {conn.ssl_cafile!r} (--ssl-cafile) does not exist")
    errors: list[KafkaError] = []
    conf = conn.client_config()
    conf["error_cb"] = errors.append
    if not debug:
        conf["log_level"] = 0  # the errors come through error_cb
    try:
        admin = AdminClient(conf)
    except KafkaException as e:
        raise ConnectionCheckError(f"bad Kafka client settings: {e.args[0].str()}") from None
    deadline = time.monotonic() + timeout
    failed: list[KafkaError] = []  # list_topics' own errors: the generic "failed to get metadata"
    while True:
        try:
            return admin.list_topics(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
        except KafkaException as e:
            failed.append(e.args[0])
        admin.poll(0.1)  # serves error_cb
        if any(e.code() in _FINAL for e in errors) or time.monotonic() >= deadline:
            raise ConnectionCheckError(f"cannot use the brokers at {conn.brokers}: {_cause(errors + failed)}")


def topic_partitions(md: Any, topic: str) -> int | None:
    """The topic's partition count in the metadata `md`, None when it does not exist."""
    t = md.topics.get(topic)
    return None if t is None or t.error is not None else len(t.partitions)


def require_topic(md: Any, topic: str, brokers: str, hint: str) -> int:
    """The partition count of `topic`, or MissingTopicError naming it and `hint`."""
    n = topic_partitions(md, topic)
    if n is None:
        raise MissingTopicError(f"topic {topic!r} does not exist on {brokers}; {hint}")
    return n


@contextlib.contextmanager
def held_logs(hold: bool = True) -> Iterator[None]:
    """While the start-up checks run, the root logger's records are held back instead of
    going to its handlers: when a check fails (the block raises) they are dropped, so
    its one line is all that is printed; when the checks pass they are logged as they
    would have been."""
    root = logging.getLogger()
    if not hold:
        yield
        return
    held: list[logging.LogRecord] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    saved = root.handlers[:]
    root.handlers = [Hold()]
    try:
        yield
    finally:
        root.handlers = saved
    for record in held:  # reached only when the block did not raise
        logging.getLogger(record.name).handle(record)
