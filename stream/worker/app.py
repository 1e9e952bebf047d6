"""The Faust application: topics, the user-state table, the encoding agent and its
timers, wired to the batch pipeline (pipeline.py) and the web views (views.py).

Built by `build_app(cfg)`; cli.py runs it under a Faust Worker.
"""

from __future__ import annotations

import gc
import json
import logging
from typing import Any

import faust
from confluent_kafka.admin import AdminClient
from faust.types import TP

from clickvec.bundle.reader import load_bundle
from clickvec.errors import ClickvecError
from clickvec.kafka import replication_defaults
from clickvec.stream.worker import faust_internals
from clickvec.stream.worker.config import StreamConfig
from clickvec.stream.worker.continuity import Continuity
from clickvec.stream.worker.engine import Engine, EngineConfig
from clickvec.stream.worker.feed import BatchFeed
from clickvec.stream.worker.metrics import Metrics
from clickvec.stream.worker.pipeline import Pipeline, fail_stopping
from clickvec.stream.worker.sink import Sink
from clickvec.stream.worker.table import TABLE_NAME, TableStore, install_restore
from clickvec.stream.worker.views import Views

log = logging.getLogger(__name__)

# The collector's youngest generation is collected each time GC_GEN0 more container
# objects are alive than at the last collection (Python's default: 700). A batch
# allocates tens of thousands (records, parsed events, per-user tuples and states) that
# reference counting frees with the batch: at 700 the collector ran every few hundred
# events, and the older generations' passes with it, walking objects about to be freed.
GC_GEN0 = 20_000

__all__ = ["TABLE_NAME", "TopicMissingError", "build_app", "changelog_replicas", "ensure_topics"]


class TopicMissingError(ClickvecError):
    """The input topic does not exist. Action: create it (clickvec produce --partitions N
    creates it) before starting the worker."""


def ensure_topics(cfg: StreamConfig, md: Any = None) -> int:
    """Partition count of the input topic; creates the output and dead-letter topics
    with the same count when missing. `md`: the cluster's metadata, if already read."""
    conn = cfg.connection()
    if md is None:
        md = AdminClient(conn.client_config()).list_topics(timeout=30)
    if cfg.in_topic not in md.topics or md.topics[cfg.in_topic].error is not None:
        raise TopicMissingError(
            f"input topic {cfg.in_topic!r} does not exist on {cfg.brokers}; create it (clickvec produce "
            "--partitions N creates it) before starting the worker"
        )
    n = len(md.topics[cfg.in_topic].partitions)
    for topic in (cfg.out_topic, cfg.dlq_topic):
        conn.ensure_topic(topic, n)
    if cfg.latest_topic:
        conn.ensure_topic(cfg.latest_topic, n, config={"cleanup.policy": "compact"})
    return n


def changelog_replicas(cfg: StreamConfig, brokers: int) -> int:
    """The changelog's replication factor: as configured, else min(3, brokers): a
    changelog on one replica loses the states with that broker's disk."""
    return cfg.replication_factor if cfg.replication_factor > 0 else max(1, min(3, brokers))


def _faust_app(cfg: StreamConfig, partitions: int, replicas: int) -> faust.App:
    return faust.App(
        cfg.group,
        broker=[f"kafka://{b.strip()}" for b in cfg.brokers.split(",")],
        broker_credentials=cfg.connection().faust_credentials(),
        store="rocksdb://",
        datadir=cfg.state_dir,
        topic_partitions=partitions,
        topic_replication_factor=replicas,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=cfg.commit_interval,
        broker_session_timeout=cfg.session_timeout,
        broker_commit_every=max(cfg.max_batch, 1000),
        stream_buffer_maxsize=max(4 * cfg.max_batch, 4096),
        web_enabled=True,
        web_host=cfg.web_host,
        web_bind=cfg.web_host,
        web_port=cfg.web_port,
        table_standby_replicas=cfg.standby_replicas,
        producer_linger_ms=2,
        topic_allow_declare=True,
    )


def _tune_consumer(app: faust.App, fetch_max_wait_ms: int) -> None:
    """Two settings Faust does not expose, applied once the consumer runs:

    - the aiokafka consumer's fetch max wait, which Faust fixes at 1500 ms;
    - Faust's Monitor sensor is taken off the per-event path: it keeps statistics for
      Faust's own web views; the worker's Prometheus metrics are kept by the pipeline."""
    faust_internals.set_fetch_max_wait(app.consumer, fetch_max_wait_ms)
    log.info("consumer fetch max wait: %d ms", fetch_max_wait_ms)
    try:
        app.sensors.remove(app.monitor)
    except KeyError:
        pass


def build_app(cfg: StreamConfig, bundle: Any | None = None, partitions: int | None = None,
              brokers: int | None = None) -> faust.App:
    """The worker's Faust app; `partitions` and `brokers` (counts) are read from the
    cluster when not given."""
    bundle = bundle or load_bundle(cfg.model, providers=cfg.providers, intra_op_threads=cfg.intra_op_threads)
    if partitions is None or brokers is None:
        md = AdminClient(cfg.librdkafka()).list_topics(timeout=30)
        partitions, brokers = ensure_topics(cfg, md), len(md.brokers)
    engine = Engine(bundle, EngineConfig(emit=cfg.emit, encoding=cfg.encoding, state_dtype=cfg.state_dtype,
                                         latest=bool(cfg.latest_topic), state_ttl_ms=cfg.state_ttl_ms,
                                         ttl_scan=cfg.state_ttl_scan, wire=cfg.wire(),
                                         dlq_payload=cfg.dlq_payload))
    metrics = Metrics()
    replicas = changelog_replicas(cfg, brokers)
    app = _faust_app(cfg, partitions, replicas)
    faust_internals.check(app.consumer)
    faust_internals.read_committed(app.consumer)
    faust_internals.stop_despite_fetch_backoff(app.consumer)

    in_topic = app.topic(cfg.in_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                         value_serializer="raw", partitions=partitions)
    table = app.Table(
        TABLE_NAME, default=None, partitions=partitions, key_type=bytes, value_type=bytes,
        extra_topic_configs=replication_defaults(replicas)[1],
        options={"block_cache_size": cfg.rocksdb_block_cache_mb << 20,
                 "write_buffer_size": cfg.rocksdb_write_buffer_mb << 20,
                 "max_write_buffer_number": 2},
    )

    install_restore(app, table, cfg.librdkafka())

    async def passed(partition: int, start: int, end: int) -> None:
        # Faust never saw these offsets: count them as done so its commits pass them.
        faust_internals.add_gap(app.consumer, TP(cfg.in_topic, partition), start, end - 1)

    async def filled(partition: int, start: int, end: int) -> None:
        metrics.gap_filled.inc(end - start)
        await passed(partition, start, end)

    feed = BatchFeed(app, cfg.in_topic, cfg.max_batch, cfg.max_wait)
    feed.install(app.consumer)
    pipeline = Pipeline(app, cfg, engine, TableStore(table, cfg.librdkafka()),
                        Sink(cfg.librdkafka(), cfg.out_topic, cfg.dlq_topic, cfg.latest_topic),
                        Continuity(cfg.librdkafka(), cfg.in_topic, cfg.group, on_filled=filled, on_passed=passed),
                        feed, metrics)
    views = Views(app, cfg, bundle, metrics, pipeline)

    @app.agent(in_topic, concurrency=1)
    async def encode(stream: Any) -> None:
        # The agent subscribes the input topic; its records arrive through `feed`, in
        # whole fetches, not through the stream (feed.py says why).
        await pipeline.run(on_first_batch=lambda: _tune_consumer(app, cfg.fetch_max_wait_ms))

    app.timer(interval=1.0)(pipeline.sweep_tail_holes)
    app.timer(interval=5.0)(pipeline.report_lag)

    @app.timer(interval=30.0)
    @fail_stopping
    async def count_users() -> None:
        if not app.rebalancing:
            metrics.users_in_state.set(len(table.data))

    @app.task
    @fail_stopping
    async def on_started() -> None:
        # Everything built so far (modules, the ORT session, Faust's services) lives as
        # long as the worker: keep it out of the collector's full passes, which would
        # otherwise pause the event loop while they walk it.
        gc.freeze()
        gc.set_threshold(GC_GEN0, *gc.get_threshold()[1:])
        views.ready = True
        log.info("clickvec worker ready: model %s on %s, %d partitions", bundle.model_id[:12],
                 ",".join(bundle.providers), partitions)

    log.info("resolved configuration: %s", json.dumps(cfg.redacted(), sort_keys=True))
    return app
