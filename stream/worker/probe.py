"""`clickvec stream`'s connection check, before any Faust client is made.

Faust's aiokafka clients, given an unreachable broker or a wrong password, retry for
tens of seconds and then end in a traceback, the cause buried in hundreds of lines of
client log. One quiet librdkafka admin client asks for the cluster's metadata first,
for a few seconds at most, and collects the errors librdkafka reports on the way: the
first one that names a cause (authentication, TLS, connection) is the one line the
worker stops with.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from clickvec.errors import ClickvecError
from clickvec.stream.worker.config import StreamConfig

# librdkafka's local error codes (confluent_kafka exposes them only as private names).
_AUTHENTICATION, _SSL, _INVALID_ARG, _UNKNOWN_PROTOCOL, _TRANSPORT, _RESOLVE = -169, -181, -186, -171, -195, -193
# Errors after which asking again cannot help: stop at once.
_FINAL = frozenset({_AUTHENTICATION, _SSL, KafkaError.SASL_AUTHENTICATION_FAILED, _INVALID_ARG, _UNKNOWN_PROTOCOL})


class ConnectionCheckError(ClickvecError):
    """The brokers could not be reached or refused this client. Action: check the
    addresses, the security protocol, the SASL credentials and the CA file named."""


def _cause(errors: list[KafkaError]) -> str:
    """The most telling of the errors librdkafka reported."""
    for codes in (_FINAL, {_TRANSPORT, _RESOLVE}):
        for e in errors:
            if e.code() in codes:
                return e.str()
    return errors[0].str() if errors else "no answer"


def cluster_metadata(cfg: StreamConfig, timeout: float = 4.0, debug: bool = False) -> Any:
    """The cluster's metadata (confluent_kafka ClusterMetadata), or ConnectionCheckError
    within about `timeout` seconds naming the cause."""
    if cfg.ssl_cafile and not Path(cfg.ssl_cafile).is_file():
        raise ConnectionCheckError(f"the CA file {cfg.ssl_cafile!r} (--ssl-cafile) does not exist")
    errors: list[KafkaError] = []
    conf = cfg.librdkafka()
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
            raise ConnectionCheckError(f"cannot use the brokers at {cfg.brokers}: {_cause(errors + failed)}")
