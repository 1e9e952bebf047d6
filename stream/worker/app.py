"""The Faust application: topics, the user-state table, the encoding agent, web views.

Built by `build_app(cfg)`; `stream.cli` runs it under a Faust Worker.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from typing import Any, NoReturn

import faust
from clickvec.stream.worker.config import StreamConfig
from clickvec.stream.worker.continuity import Continuity
from clickvec.stream.worker.engine import Engine, EngineConfig, PendingStates, Record, StateStore
from clickvec.stream.worker.feed import Batch, BatchFeed
from clickvec.stream.worker.metrics import Metrics
from clickvec.stream.worker.sink import DeliveryError, Sink, reliable_producer
from confluent_kafka import KafkaError
from confluent_kafka.admin import AdminClient
from faust.types import TP
from rocksdict import WriteBatch

from clickvec.bundle.reader import load_bundle
from clickvec.kafka import produce_waiting

log = logging.getLogger(__name__)

TABLE_NAME = "user-state"


class TableStore(StateStore):
    """The Faust table's RocksDB databases as a `StateStore`; a user's state lives in
    the database of its input partition, as Faust's store keeps it (the partition of the
    current event).

    Reads and writes go straight to the partition's database (rocksdict, raw bytes, the
    keys and values Faust's store would hold); a batch's states are written as one
    `WriteBatch` per partition, as Faust applies changelog batches in recovery. Through
    Faust's `table[k] = v`, each state was a separate RocksDB write, with a WAL append
    each: 15% of the worker's event loop (benchmarks/results/profile_round3.txt).

    Changelog records go through a confluent-kafka producer rather than Faust's own
    (`table.send_changelog`): the bytes, topic and partition are the ones Faust would
    write and recovers from, but librdkafka sends them from its own thread, where
    Faust's Python producer spent about a third of the worker's event loop
    (benchmarks/results/profile_*.txt). It also lets `flush` wait for the brokers:
    Faust's producer-buffer flush gives up after 0.1 s, so offsets could have been
    committed before the states reached the changelog."""

    def __init__(self, table: Any, producer_conf: dict[str, Any]) -> None:
        self.table = table
        self.topic = table.changelog_topic.get_topic_name()
        self.producer = reliable_producer(producer_conf)
        self._offsets: dict[int, int] = {}  # changelog partition -> last offset written
        self._errors: list[str] = []

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err))
        elif msg.offset() > self._offsets.get(msg.partition(), -1):
            self._offsets[msg.partition()] = msg.offset()

    def _db(self, partition: int) -> Any:
        # Not cached: Faust closes and reopens a partition's database across rebalances.
        return self.table.data._db_for_partition(partition)

    def get(self, user_id: str, record: Record) -> bytes | None:
        return self._db(record.partition).get(user_id.encode())

    def put(self, user_id: str, value: bytes, record: Record) -> None:
        self.put_many([(user_id, value, record)])

    def put_many(self, states: Iterable[tuple[str, bytes, Record]]) -> None:
        """Write RocksDB (one batch per partition) and send the changelog records;
        `flush` waits for the brokers."""
        batches: dict[int, Any] = {}
        producer, topic, on_delivery = self.producer, self.topic, self._on_delivery
        produce = producer.produce
        for user_id, value, record in states:
            key = user_id.encode()
            partition = record.partition
            wb = batches.get(partition)
            if wb is None:
                wb = batches[partition] = WriteBatch(raw_mode=True)
            wb.put(key, value)
            try:
                produce(topic, value, key, partition, on_delivery)
            except BufferError:  # local queue full: wait for deliveries to drain it
                produce_waiting(producer, topic, key, value, on_delivery, partition=partition)
        for partition, wb in batches.items():
            self._db(partition).write(wb)

    async def flush(self, timeout: float = 30.0) -> None:
        """Wait until every changelog record written so far is acknowledged, then record
        the changelog offsets RocksDB holds (recovery resumes after them)."""
        loop = asyncio.get_running_loop()
        remaining = await loop.run_in_executor(None, self.producer.flush, timeout)
        if remaining or self._errors:
            errs, self._errors = self._errors, []
            raise DeliveryError(f"changelog {self.topic}: {remaining} records not delivered within {timeout}s, "
                                f"errors: {errs[:3]}")
        offsets, self._offsets = self._offsets, {}
        for partition, offset in offsets.items():
            self.table.data.set_persisted_offset(TP(self.topic, partition), offset)


def ensure_topics(cfg: StreamConfig) -> int:
    """Partition count of the input topic; creates the output and dead-letter topics
    with the same count when missing."""
    conn = cfg.connection()
    md = AdminClient(conn.client_config()).list_topics(timeout=30)
    if cfg.in_topic not in md.topics or md.topics[cfg.in_topic].error is not None:
        raise SystemExit(
            f"input topic {cfg.in_topic!r} does not exist on {cfg.brokers}; create it (clickvec produce "
            "--partitions N creates it) before starting the worker"
        )
    n = len(md.topics[cfg.in_topic].partitions)
    for topic in (cfg.out_topic, cfg.dlq_topic):
        conn.ensure_topic(topic, n)
    return n


def fail_stop(exc: BaseException) -> NoReturn:
    """End the process at once when a batch cannot be applied and stored (its outputs
    refused, ONNX Runtime failing, a hole that cannot be read back, ...).

    Faust's own handling of a crashed agent, restarting it in this process or stopping
    the app gracefully, acks events the crashed agent had taken, so their offsets get
    committed although they were never applied: measured, a refused output topic lost 2-5
    of 1,000 events that way (tests/test_stream_e2e.py). Exiting before anything else runs
    leaves every unacked event to the next start, exactly as after a SIGKILL, which the
    crash test covers; the group notices the departure at its session timeout."""
    log.critical("stopping the worker: %s: %s (the events not yet acked are processed again at the next "
                 "start)", type(exc).__name__, exc, exc_info=exc)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(70)


def _tune_consumer(app: faust.App, fetch_max_wait_ms: int) -> bool:
    """Two settings Faust does not expose, applied once the consumer runs:

    - the aiokafka consumer's fetch max wait, which Faust fixes at 1500 ms;
    - Faust's Monitor sensor is taken off the per-event path: it keeps statistics for
      Faust's own web views (about 5% of the worker's event loop in a profile); the
      worker's Prometheus metrics are kept by the agent."""
    try:
        fetcher = app.consumer._thread._ensure_consumer()._fetcher  # type: ignore[attr-defined]
        fetcher._fetch_max_wait_ms = fetch_max_wait_ms
    except AttributeError as e:  # another Faust or aiokafka layout: keep its default
        log.warning("could not set the consumer's fetch max wait (%s); Faust's 1500 ms stays", e)
    else:
        log.info("consumer fetch max wait: %d ms", fetch_max_wait_ms)
    try:
        app.sensors.remove(app.monitor)
    except KeyError:
        pass
    return True


def build_app(cfg: StreamConfig, bundle: Any | None = None, partitions: int | None = None) -> faust.App:
    if partitions is None:
        partitions = ensure_topics(cfg)
    bundle = bundle or load_bundle(cfg.model, providers=cfg.providers, intra_op_threads=cfg.intra_op_threads)
    engine = Engine(bundle, EngineConfig(emit=cfg.emit, encoding=cfg.encoding, state_dtype=cfg.state_dtype))
    metrics = Metrics()

    app = faust.App(
        cfg.group,
        broker=[f"kafka://{b.strip()}" for b in cfg.brokers.split(",")],
        broker_credentials=cfg.connection().faust_credentials(),
        store="rocksdb://",
        datadir=cfg.state_dir,
        topic_partitions=partitions,
        topic_replication_factor=cfg.replication_factor,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=cfg.commit_interval,
        broker_session_timeout=cfg.session_timeout,
        broker_commit_every=max(cfg.max_batch, 1000),
        stream_buffer_maxsize=max(4 * cfg.max_batch, 4096),
        web_enabled=True,
        web_host=cfg.web_host,
        web_bind=cfg.web_host,
        web_port=cfg.web_port,
        table_standby_replicas=0,
        producer_linger_ms=2,
        topic_allow_declare=True,
    )
    app.clickvec = {"cfg": cfg, "engine": engine, "metrics": metrics, "bundle": bundle}  # type: ignore[attr-defined]

    in_topic = app.topic(cfg.in_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                         value_serializer="raw", partitions=partitions)
    table = app.Table(
        TABLE_NAME, default=None, partitions=partitions, key_type=bytes, value_type=bytes,
        options={"block_cache_size": cfg.rocksdb_block_cache_mb << 20,
                 "write_buffer_size": cfg.rocksdb_write_buffer_mb << 20,
                 "max_write_buffer_number": 2},
    )
    store = TableStore(table, cfg.librdkafka())
    sink = Sink(cfg.librdkafka(), cfg.out_topic, cfg.dlq_topic)
    state: dict[str, Any] = {"ready": False, "batches": 0, "started": time.time(), "fetch_tuned": False}

    async def filled(partition: int, start: int, end: int) -> None:
        # Faust never saw these offsets: count them as done so its commits pass them.
        metrics.gap_filled.inc(end - start)
        add_gap = getattr(app.consumer, "_add_gap", None)
        if add_gap is not None:
            await add_gap(TP(cfg.in_topic, partition), start, end - 1)

    continuity = Continuity(cfg.librdkafka(), cfg.in_topic, cfg.group, on_filled=filled)

    pending = PendingStates(store)
    # Batches go through two stages. `apply_batch`: fill holes, one ORT call, send the
    # outputs. `store_batches`: once a batch's outputs are acknowledged, write its states
    # (RocksDB + changelog), wait for the changelog, then ack its events. The next batch
    # is computed while the previous one is in flight; it sees the previous batch's
    # states through `pending`.
    inflight: asyncio.Queue[Any] = asyncio.Queue(maxsize=max(1, cfg.pipeline_depth))
    applying = asyncio.Lock()
    state["last_batch"] = time.monotonic()

    async def apply_batch(batch: Batch | None, records: list[Record], t0: float) -> None:
        async with applying:
            records = await continuity.complete(records, app.consumer_generation_id)
            result = engine.process(records, pending)
            state["batches"] += 1
            pending.hold(result, state["batches"])
            delivered = sink.send(result.outputs, result.dead, asyncio.get_running_loop())
            # The storer never stops with an error (it ends the process, `fail_stop`), so
            # waiting on it cannot hang.
            await inflight.put((state["batches"], batch, records, result, delivered, t0))
            if cfg.pipeline_depth == 0:  # one batch at a time
                await inflight.join()
            state["last_batch"] = time.monotonic()

    feed = BatchFeed(app, cfg.in_topic, cfg.max_batch, cfg.max_wait)
    feed.install(app.consumer)

    @app.agent(in_topic, concurrency=1)
    async def encode(stream: Any) -> None:
        # The agent subscribes the input topic; its records arrive through `feed`, in
        # whole fetches, not through the stream (stream/feed.py says why).
        storer = asyncio.ensure_future(store_batches(inflight))
        state["storer"] = storer
        try:
            async for batch in feed.batches():
                t0 = time.perf_counter()
                if not state["fetch_tuned"]:
                    state["fetch_tuned"] = _tune_consumer(app, cfg.fetch_max_wait_ms)
                feed.track(batch)
                await apply_batch(batch, batch.records, t0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            fail_stop(exc)
        finally:
            if not storer.done():
                storer.cancel()

    @app.timer(interval=1.0)
    async def sweep_tail_holes() -> None:
        """Records Faust dropped at the end of a partition (nothing after them arrives to
        reveal the hole): when the agent has been idle for two seconds and the consumer's
        position is past the next offset to apply, read the rest back and apply it."""
        storer = state.get("storer")
        if (storer is None or storer.done() or app.rebalancing or applying.locked() or not feed.idle()
                or time.monotonic() - state["last_batch"] < 2.0):
            return
        positions: dict[int, int] = {}
        for tp in app.consumer.assignment():
            if tp.topic == cfg.in_topic:
                try:
                    pos = await app.consumer.position(tp)
                except Exception:  # not fetched yet
                    continue
                if pos is not None:
                    positions[tp.partition] = pos
        records = await continuity.tail(positions, app.consumer_generation_id)
        if records:
            await apply_batch(None, records, time.perf_counter())

    async def store_batches(inflight: asyncio.Queue[Any]) -> None:
        try:
            await _store_batches(inflight)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            fail_stop(exc)

    async def _store_batches(inflight: asyncio.Queue[Any]) -> None:
        while True:
            number, batch, records, result, delivered, t0 = await inflight.get()
            # Outputs are on the brokers: only now may the states say these events are applied.
            await delivered
            engine.commit_states(result, store)
            # The batch's events are acked (and later committed) only once their states
            # are on the changelog: a worker that takes the partitions over recovers them.
            await store.flush()
            pending.release(result, number)
            if batch is not None:
                feed.ack(batch, records)
            inflight.task_done()
            now = time.time()
            metrics.events_in.inc(len(records))
            metrics.events_applied.inc(result.applied)
            metrics.vectors_out.inc(len(result.outputs))
            metrics.replayed.inc(result.replayed)
            metrics.state_resets.inc(result.state_resets)
            for _, _, reason in result.dead:
                metrics.dead.labels(reason).inc()
            metrics.batch_size.observe(len(records))
            metrics.infer_seconds.observe(result.infer_s)
            metrics.batch_seconds.observe(time.perf_counter() - t0)
            metrics.users.set(result.users)
            for ts in result.event_ts:
                metrics.latency.observe(max(0.0, now - ts / 1000.0))

    @app.timer(interval=5.0)
    async def report_lag() -> None:
        consumer = app.consumer
        for tp in consumer.assignment():
            if tp.topic != cfg.in_topic:
                continue
            try:
                hw = consumer.highwater(tp)
                pos = await consumer.position(tp)
            except Exception:  # not yet fetched
                continue
            if hw is not None and pos is not None:
                metrics.lag.labels(str(tp.partition)).set(max(0, hw - pos))

    @app.timer(interval=30.0)
    async def count_users() -> None:
        if not app.rebalancing:
            metrics.users_in_state.set(len(table.data))

    @app.task
    async def on_started() -> None:
        # Everything built so far (modules, the ORT session, Faust's services) lives as
        # long as the worker: keep it out of the collector's full passes, which otherwise
        # paused the event loop for ~50-60 ms each.
        gc.freeze()
        state["ready"] = True
        log.info("clickvec worker ready: model %s on %s, %d partitions", bundle.model_id[:12],
                 ",".join(bundle.providers), partitions)

    @app.page("/metrics")
    async def metrics_view(self: Any, request: Any) -> Any:
        return self.bytes(metrics.render(), content_type="text/plain; version=0.0.4")

    @app.page("/healthz")
    async def health(self: Any, request: Any) -> Any:
        return self.json({"status": "ok", "batches": state["batches"]})

    @app.page("/readyz")
    async def ready(self: Any, request: Any) -> Any:
        ok = bool(state["ready"]) and not app.rebalancing
        try:
            parts = sorted(tp.partition for tp in app.consumer.assignment() if tp.topic == cfg.in_topic)
        except Exception:  # consumer not started yet
            parts = []
        return self.json({"ready": ok, "model_id": bundle.model_id, "partitions": parts},
                         status=200 if ok else 503)

    @app.page("/config")
    async def config_view(self: Any, request: Any) -> Any:
        return self.json(cfg.redacted())

    log.info("resolved configuration: %s", json.dumps(cfg.redacted(), sort_keys=True))
    return app
