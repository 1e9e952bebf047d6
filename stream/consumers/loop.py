"""`VectorTopicLoop`, the consumer loop shared by `clickvec alerts` and `clickvec recommend`.

An ordinary confluent-kafka consumer-group member on the vector topic: consume a batch,
hand the decoded `VectorMessage`s to a handler, produce what it returns, flush, and only
then commit the batch's offsets. A crash between produce and commit re-delivers the
batch (at least once); nothing is committed that was not published. SIGTERM / SIGINT
finish the current batch and leave the group cleanly.

A tombstone on the vector topic (key = user id, null value: the user was forgotten or
its state expired, stream/worker/engine.py) goes to the handler's `forget(user_id)`, in
order with the vectors around it.

Cut-over control records (clickvec/lifecycle/cutover.py) are followed with a
`ModelFollower`: after one, a partition's vectors of any other model are skipped
(`other_model` in the stats) and the handler's `cutover(cut)` is told, if it has one. The
active model per partition is committed with the offsets (the commit's metadata), so a
consumer that gets the partition after a restart or rebalance, past the control record,
follows it too. Duplicates (same user and seq) are left to the handler.

Imports neither torch nor `training`.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from clickvec.contract.messages import VectorMessage
from clickvec.contract.topics import DEFAULT_OUT_TOPIC
from clickvec.errors import ClickvecError
from clickvec.kafka import KafkaConnection, add_kafka_arguments, produce_waiting
from clickvec.lifecycle.cutover import Cutover, ModelFollower, is_control
from clickvec.preflight import cluster_metadata, held_logs, require_topic, topic_partitions

log = logging.getLogger(__name__)

Record = tuple[bytes | None, bytes | None]  # (key, value) to publish; None value: a tombstone
Handler = Callable[[Sequence[VectorMessage]], list[Record]]
T = TypeVar("T")


@dataclass(frozen=True)
class Tombstone:
    """A vector-topic tombstone: forget `user_id`."""

    user_id: str


class ConsumerError(ClickvecError):
    """The consumer could not publish or commit. Action: check the broker, the topics and
    the security flags; the message names the topic and the first error. Offsets of the
    failed batch were not committed, so a restart re-reads it."""


@dataclass(frozen=True)
class LoopConfig:
    """One consumer's resolved settings (printed at start-up)."""

    in_topic: str
    out_topic: str
    group: str
    batch: int = 500  # messages per consume call: one handler call, one flush, one commit
    poll_s: float = 0.5
    duration_s: float | None = None  # stop after this many seconds
    idle_exit_s: float | None = None  # stop after this long without a message
    connection: KafkaConnection = field(default_factory=KafkaConnection, repr=False)

    def describe(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "connection"}
        d["brokers"] = self.connection.brokers
        return d


@dataclass
class LoopStats:
    consumed: int = 0
    decoded: int = 0
    undecodable: int = 0
    controls: int = 0  # cut-over control records read
    other_model: int = 0  # vectors skipped: not of the partition's active model
    published: int = 0
    batches: int = 0
    commits: int = 0
    commit_failures: int = 0
    seconds: float = 0.0
    stopped_by: str = ""


def add_loop_arguments(p: argparse.ArgumentParser, out_default: str, group_default: str) -> None:
    add_kafka_arguments(p)
    p.add_argument("--in", dest="in_topic", default=DEFAULT_OUT_TOPIC,
                   help="vector topic (default %(default)s)")
    p.add_argument("--out", dest="out_topic", default=out_default, help="output topic (default %(default)s)")
    p.add_argument("--group", default=group_default, help="consumer group (default %(default)s)")
    p.add_argument("--batch", type=int, default=500, help="messages per batch (default %(default)s)")
    p.add_argument("--duration", type=float, default=None, help="stop after SECONDS")
    p.add_argument("--idle-exit", type=float, default=None, help="stop after SECONDS without input")
    p.add_argument("--summary", type=Path, default=None, help="write a JSON summary here on exit")
    p.add_argument("--debug", action="store_true", help="librdkafka's own log during the start-up check")


def loop_config(args: argparse.Namespace) -> LoopConfig:
    if args.batch < 1:
        raise ValueError("--batch must be >= 1")
    return LoopConfig(args.in_topic, args.out_topic, args.group, args.batch, 0.5, args.duration,
                      args.idle_exit, KafkaConnection.from_args(args))


def check_brokers_and_topics(cfg: LoopConfig, debug: bool = False) -> None:
    """Before the loop's clients are made: the brokers (reachable, credentials, TLS: one
    line within seconds; a consumer given a wrong address would otherwise poll forever),
    the input topic (it must exist: `clickvec stream` creates it), and the output topic,
    created with the input's partition count when missing."""
    conn = cfg.connection
    md = cluster_metadata(conn, debug=debug)
    n = require_topic(md, cfg.in_topic, conn.brokers,
                      "start `clickvec stream` first (it creates its output topic) or create it")
    if topic_partitions(md, cfg.out_topic) is None:
        conn.ensure_topic(cfg.out_topic, n)


def start_checks(prog: str, args: argparse.Namespace, load: Callable[[], T]) -> tuple[LoopConfig, T] | int:
    """A consumer command's start-up, in this order: `load()` (e.g. the model bundle, so a
    bad path is named before any connection), the settings, the brokers and the topics.
    Returns the loop's settings and what `load` returned, or, on a user's mistake, exit
    code 2 after one line on stderr (their log held back; see clickvec/preflight.py)."""
    try:
        with held_logs(not getattr(args, "debug", False)):
            loaded = load()
            cfg = loop_config(args)
            check_brokers_and_topics(cfg, getattr(args, "debug", False))
    except (ClickvecError, OSError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    return cfg, loaded


def write_summary(path: Path | None, summary: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True, default=float) + "\n")
    tmp.replace(path)


def run_command(prog: str, cfg: LoopConfig, handler: Handler, summary_path: Path | None,
                config: dict[str, Any], results: Callable[[], dict[str, Any]]) -> int:
    """A consumer command's run: the loop until it stops, then the summary
    `{"config": config, "loop": stats, **results()}` written to `summary_path` and printed
    without its config. 1 (nothing written) when the loop failed."""
    try:
        stats = VectorTopicLoop(cfg, handler).run()
    except Exception as e:
        log.error("%s: %s", prog, e)
        return 1
    summary = {"config": config, "loop": asdict(stats), **results()}
    write_summary(summary_path, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, default=float))
    return 0


class VectorTopicLoop:
    """Consume -> handle -> produce -> flush -> commit, until stopped."""

    def __init__(self, cfg: LoopConfig, handler: Handler) -> None:
        self.cfg = cfg
        self.handler = handler
        self.stats = LoopStats()
        self._stop = threading.Event()
        self._stop_reason = ""
        self._delivery_errors: list[str] = []
        self.follower = ModelFollower()

    def stop(self, reason: str = "stop()") -> None:
        self._stop_reason = self._stop_reason or reason
        self._stop.set()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # in-process use from a thread: the caller calls stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, _f: self.stop(signal.Signals(s).name))

    def run(self) -> LoopStats:
        from confluent_kafka import Consumer, Producer

        cfg = self.cfg
        self._install_signals()
        consumer = Consumer(cfg.connection.client_config(**{
            "group.id": cfg.group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
        }))
        producer = Producer(cfg.connection.client_config(**{"linger.ms": 5, "enable.idempotence": True}))
        consumer.subscribe([cfg.in_topic], on_assign=self._restore_active)
        log.info("consuming %s as group %s -> %s", cfg.in_topic, cfg.group, cfg.out_topic)
        t0 = last_input = time.monotonic()
        try:
            while not self._stop.is_set():
                if self._time_is_up(t0, last_input):
                    break
                msgs = consumer.consume(num_messages=cfg.batch, timeout=cfg.poll_s)
                if not msgs:
                    continue
                last_input = time.monotonic()
                out, ends = self.handle(msgs)
                self._publish(producer, out)
                self.stats.batches += 1
                if ends:
                    self._commit(consumer, ends)
        finally:
            self.stats.seconds = round(time.monotonic() - t0, 3)
            self.stats.stopped_by = self._stop_reason or "error"
            producer.flush(10)
            consumer.close()  # leaves the group: partitions move at once
            log.info("consumer stopped (%s): %s", self.stats.stopped_by, asdict(self.stats))
        return self.stats

    def handle(self, msgs: list[Any]) -> tuple[list[Record], dict[tuple[str, int], int]]:
        """One consumed batch: the records to publish, and the offset to commit per
        (topic, partition) once they are."""
        decoded, ends = self._decode(msgs)
        self.stats.decoded += len(decoded)
        return self.dispatch(decoded), ends

    def dispatch(self, items: list[VectorMessage | Tombstone]) -> list[Record]:
        """The handler on each run of vectors, `handler.forget` on each tombstone, in order."""
        out: list[Record] = []
        run: list[VectorMessage] = []
        forget = getattr(self.handler, "forget", None)
        for item in items:
            if isinstance(item, Tombstone):
                if run:
                    out += self.handler(run)
                    run = []
                if forget is not None:
                    out += forget(item.user_id)
            else:
                run.append(item)
        if run:
            out += self.handler(run)
        return out

    def _time_is_up(self, t0: float, last_input: float) -> bool:
        """Stop (and say why) once --duration has passed or --idle-exit without input."""
        cfg = self.cfg
        now = time.monotonic()
        if cfg.duration_s is not None and now - t0 >= cfg.duration_s:
            self.stop("duration")
            return True
        if cfg.idle_exit_s is not None and now - last_input >= cfg.idle_exit_s:
            self.stop("idle")
            return True
        return False

    def _decode(self, msgs: list[Any]) -> tuple[list[VectorMessage | Tombstone], dict[tuple[str, int], int]]:
        """The batch's vector messages and tombstones, and the offset to commit per
        (topic, partition)."""
        decoded: list[VectorMessage | Tombstone] = []
        ends: dict[tuple[str, int], int] = {}
        for m in self._readable(msgs, ends):
            if m.value() is None and m.key():
                decoded.append(Tombstone(m.key().decode("utf-8", "replace")))
                continue
            try:
                if is_control(m.key()):
                    self.stats.controls += 1
                    self._cutover(m.partition(), Cutover.from_bytes(m.value()))
                    continue
                msg = VectorMessage.from_bytes(m.value())
            except (ValueError, TypeError, KeyError) as e:
                self.stats.undecodable += 1
                log.warning("skipping undecodable vector message %s[%d] offset=%d: %s",
                            m.topic(), m.partition(), m.offset(), e)
                continue
            if self.follower.takes_model(m.partition(), msg.model_id):
                decoded.append(msg)
            else:
                self.stats.other_model += 1
        return decoded, ends

    def _readable(self, msgs: list[Any], ends: dict[tuple[str, int], int]) -> Iterator[Any]:
        """The messages without a consumer error (a fatal one raises), counted, with the
        offset to commit per (topic, partition) recorded in `ends`."""
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise ConsumerError(f"fatal consumer error: {err}")
                log.warning("consumer error: %s", err)
                continue
            self.stats.consumed += 1
            ends[(m.topic(), m.partition())] = m.offset() + 1
            yield m

    def _cutover(self, partition: int, cut: Cutover) -> None:
        new = self.follower.active.get(partition) != cut.model_id
        self.follower.control(partition, cut)
        note = getattr(self.handler, "cutover", None)
        if new and note is not None:
            note(cut)
        if new:
            log.info("vector-topic partition %d cut over to model %s (from %s)", partition, cut.model_id[:12],
                     cut.from_model_id[:12] or "?")

    def _restore_active(self, consumer: Any, partitions: list[Any]) -> None:
        """On assignment: the active model of each partition, from the committed offsets'
        metadata (a control record before the committed offset is not read again)."""
        try:
            for tp in consumer.committed(partitions, timeout=10):
                if tp.error is None and tp.metadata:
                    self._cutover(tp.partition, Cutover(tp.metadata))
        except Exception as e:  # noqa: BLE001 - the control records still read later apply
            log.warning("could not read the committed offsets' metadata (active model): %s", e)

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None and len(self._delivery_errors) < 10:
            self._delivery_errors.append(f"{msg.topic()}[{msg.partition()}]: {err}")

    def _publish(self, producer: Any, out: list[Record]) -> None:
        """Produce and flush `out`; raise unless every record was delivered."""
        cfg = self.cfg
        errors = self._delivery_errors
        for key, value in out:
            produce_waiting(producer, cfg.out_topic, key, value, self._on_delivery)
        remaining = producer.flush(30)
        if errors or remaining:
            raise ConsumerError(
                f"could not publish to {cfg.out_topic!r}: "
                + (f"{errors}" if errors else f"{remaining} messages still queued after 30 s")
            )
        self.stats.published += len(out)

    def _commit(self, consumer: Any, ends: dict[tuple[str, int], int]) -> None:
        from confluent_kafka import KafkaError, KafkaException, TopicPartition

        try:
            active = self.follower.active
            offsets = [TopicPartition(t, p, o, metadata=active[p]) if p in active else TopicPartition(t, p, o)
                       for (t, p), o in ends.items()]
            consumer.commit(offsets=offsets, asynchronous=False)
            self.stats.commits += 1
        except KafkaException as e:
            # A rebalance took the partition: its next owner re-reads the batch.
            if e.args[0].code() in (KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION,
                                    KafkaError.UNKNOWN_MEMBER_ID):
                self.stats.commit_failures += 1
                log.warning("commit lost to a rebalance (%s); the batch will be re-read", e)
            else:
                raise ConsumerError(f"commit to group {self.cfg.group!r} failed: {e}") from None
