"""`clickvec stream`'s connection check, before any Faust client is made: the shared
start-up check of every Kafka command (clickvec/preflight.py) on the worker's settings.

Faust's aiokafka clients, given an unreachable broker or a wrong password, retry for
tens of seconds and then end in a traceback, the cause buried in hundreds of lines of
client log; the check names the cause in one line within seconds.
"""

from __future__ import annotations

from typing import Any

from clickvec.preflight import ConnectionCheckError
from clickvec.preflight import cluster_metadata as _cluster_metadata
from clickvec.stream.worker.config import StreamConfig

__all__ = ["ConnectionCheckError", "cluster_metadata"]


def cluster_metadata(cfg: StreamConfig, timeout: float = 4.0, debug: bool = False) -> Any:
    """The cluster's metadata (confluent_kafka ClusterMetadata), or ConnectionCheckError
    within about `timeout` seconds naming the cause."""
    return _cluster_metadata(cfg.connection(), timeout=timeout, debug=debug)
