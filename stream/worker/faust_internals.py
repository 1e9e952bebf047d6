"""Every use of Faust's and aiokafka's private attributes, in one place.

The worker reaches past Faust's public API in a few places (feed.py and table.py say
why): it replaces the consumer's drain loop, ties its batches into the consumer's offset
bookkeeping, writes the table's RocksDB databases directly, tells the consumer about
offsets read back from the brokers, sets the aiokafka consumer's fetch max wait, and
runs the worker's bulk restore of the table (restore.py) inside Faust's recovery.
The code that does so lives here and nowhere else (ruff's SLF001 rule enforces it).

Private attributes change without notice: pyproject.toml pins the faust-streaming and
aiokafka series this was written and tested against (`TESTED`), and `check` runs at
start-up and stops the worker with one line naming what is missing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.consumer.fetcher import Fetcher as AIOKafkaFetcher
from faust.stores.rocksdb import Store as RocksDBStore
from faust.tables.recovery import Recovery
from faust.transport.consumer import ack_lock
from faust.types import TP

from clickvec.stream.worker.engine import Record

log = logging.getLogger(__name__)

TESTED = {"faust-streaming": "0.15", "aiokafka": "0.14"}  # the series pyproject.toml pins

# What this module reads or replaces on Faust's consumer (all set in its __init__ or
# defined on its class).
CONSUMER_ATTRIBUTES = (
    "_drain_messages", "_wait_next_records", "_to_message", "_stopped", "_read_offset",
    "_commit_every", "_buffered_partitions", "_n_acked", "_unacked_messages",
    "_committed_offset", "_acked_index", "_acked", "_waiting_for_ack", "_thread",
)


def _installed(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _assigned_in_init(cls: type, name: str) -> bool:
    """Whether `cls.__init__` assigns `self.<name>` (an instance attribute of an object
    that only exists once the consumer runs)."""
    init = getattr(cls, "__init__", None)
    return name in getattr(getattr(init, "__code__", None), "co_names", ())


def missing_internals(consumer: Any, store_class: type = RocksDBStore,
                      fetch_classes: Iterable[tuple[type, str]] = ((AIOKafkaConsumer, "_fetcher"),
                                                                   (AIOKafkaConsumer, "_isolation_level"),
                                                                   (AIOKafkaFetcher, "_fetch_max_wait_ms"),
                                                                   (AIOKafkaFetcher, "_pending_tasks"))
                      ) -> list[str]:
    """The private attributes this module uses that the installed Faust / aiokafka lack,
    as "Class.attribute"; `consumer` is the app's (built, not yet started) consumer."""
    gaps = [f"{type(consumer).__name__}.{name}" for name in CONSUMER_ATTRIBUTES if not hasattr(consumer, name)]
    thread = getattr(consumer, "_thread", None)
    for name in ("_ensure_consumer", "_create_consumer"):
        if thread is not None and not hasattr(thread, name):
            gaps.append(f"{type(thread).__name__}.{name}")
    gaps += [f"{cls.__name__}.{name}" for cls, name in fetch_classes if not _assigned_in_init(cls, name)]
    if not hasattr(Recovery, "_build_offsets"):
        gaps.append("Recovery._build_offsets")
    if not hasattr(store_class, "_db_for_partition"):
        gaps.append(f"{store_class.__name__}._db_for_partition")
    elif not _assigned_in_init(store_class, "_dbs"):  # (a store without the first lacks both)
        gaps.append(f"{store_class.__name__}._dbs")
    return gaps


def check(consumer: Any, **classes: Any) -> None:
    """Stop the worker with one line (SystemExit, no traceback) when the installed Faust
    or aiokafka lacks what this module needs."""
    gaps = missing_internals(consumer, **classes)
    if gaps:
        installed = ", ".join(f"{d} {_installed(d)}" for d in TESTED)
        tested = ", ".join(f"{d} {v}.x" for d, v in TESTED.items())
        raise SystemExit(f"clickvec worker: the installed {installed} lack {', '.join(gaps)}; the worker "
                         f"was tested with {tested} (the versions pyproject.toml pins): install those")


# -- the consumer's drain loop (feed.py) ---------------------------------------------------

def replace_drain(consumer: Any, drain: Callable[[Any], Awaitable[None]]) -> None:
    """Run `drain(fetcher)` in place of the consumer's `_drain_messages(fetcher)`."""
    consumer._drain_messages = drain


class FetchChain:
    """Per input partition, the offset of the last record the consumer returned and
    the drain handed on, while nothing was dropped since (same generation).

    Between two records the consumer returns one after the other, a read_committed
    consumer skips only what no reader can see (transaction markers, aborted records,
    compacted offsets): such an offset gap is no hole. `link` gives, for each record
    that follows a gap, the offset of the record before it in the chain."""

    def __init__(self) -> None:
        self.last: dict[int, int] = {}
        self.generation: int | None = None

    def link(self, generation: int, partition: int, offsets: Sequence[int], skips: dict[tuple[int, int], int]) -> None:
        if generation != self.generation:
            self.last.clear()
            self.generation = generation
        if not offsets:
            return
        prev = self.last.get(partition)
        if offsets[-1] - offsets[0] + 1 == len(offsets):
            # A contiguous fetch (the usual case): only its start can follow a gap.
            if prev is not None and offsets[0] > prev + 1:
                skips[(partition, offsets[0])] = prev
        else:
            for off in offsets:
                if prev is not None and off > prev + 1:
                    skips[(partition, off)] = prev
                prev = off
        self.last[partition] = offsets[-1]

    def broken(self) -> None:
        """Records were dropped: no later record links to an earlier one."""
        self.last.clear()


async def drain_batches(app: Any, consumer: Any, fetcher: Any, topic: str,
                        put: Callable[[int, list[Record], dict[tuple[int, int], int]], Awaitable[None]],
                        fetched: Callable[[dict[int, int]], None], handed: Callable[[], None]) -> None:
    """Faust's `Consumer._drain_messages`, with the records of `topic` handed to
    `put(generation, records, skips)` as one list per fetch (`skips`: `FetchChain`);
    other topics' records (table changelogs during recovery) take Faust's own path,
    message by message.

    `fetched(ends)` is called as soon as a fetch returns, before any await (`ends`: per
    input partition, one past the last offset returned), and `handed()` once its records
    are queued or dropped: the tail-hole sweep reads back only offsets fetched and no
    longer in hand (a fetch in hand arrives by itself)."""
    chain = FetchChain()
    while not (consumer._stopped.is_set() or fetcher._stopped.is_set()):
        records, active = await consumer._wait_next_records(1.0)
        ends = {tp.partition: recs[-1].offset + 1 for tp, recs in (records or {}).items()
                if tp.topic == topic and recs}
        fetched(ends)
        try:
            await _drain_one(app, consumer, topic, records, active, chain, put)
        finally:
            handed()


async def _drain_one(app: Any, consumer: Any, topic: str, records: Any, active: Any, chain: FetchChain,
                     put: Callable[[int, list[Record], dict[tuple[int, int], int]], Awaitable[None]]) -> None:
    """One fetch of `drain_batches`."""
    callback = consumer.callback
    read_offset = consumer._read_offset
    to_message = consumer._to_message
    commit_every = consumer._commit_every
    generation = app.consumer_generation_id
    await asyncio.sleep(0)
    if not records or consumer.should_stop:
        return
    if not consumer.flow_active:
        # As Faust's `getmany`: what was fetched while flow stopped is dropped
        # and the partitions go back to their committed offsets.
        chain.broken()
        try:
            await consumer.perform_seek()
        except Exception as exc:  # noqa: BLE001 - Faust logs and goes on too
            log.warning("seek to committed offsets while flow stopped: %s", exc)
        return
    buffered = consumer._buffered_partitions
    new_tuple = tuple.__new__
    batch: list[Record] = []
    skips: dict[tuple[int, int], int] = {}
    others: list[tuple[TP, list[Any]]] = []
    for tp, recs in records.items():
        if active is not None and tp not in active and tp not in buffered:
            if tp.topic == topic:
                chain.broken()
            continue
        if tp.topic != topic:
            others.append((tp, recs))
            continue
        partition = tp.partition
        floor = read_offset[tp]
        kept = recs if floor is None else [r for r in recs if r.offset >= floor]
        # tuple.__new__ skips the NamedTuple's Python-level __new__: one Record per event.
        batch += [new_tuple(Record, (r.key, r.value, topic, partition, r.offset)) for r in kept]
        chain.link(generation, partition, [r.offset for r in kept], skips)
        if recs:
            read_offset[tp] = recs[-1].offset
    for tp, recs in others:
        for r in recs:
            if not consumer.flow_active or app.consumer_generation_id != generation:
                break
            await consumer.wait_first(callback(to_message(tp, r)), consumer.suspend_flow.wait())
            read_offset[tp] = r.offset
    if commit_every is not None and consumer._n_acked >= commit_every:
        consumer._n_acked = 0
        await consumer.commit()
    if not batch:
        return
    if app.consumer_generation_id != generation or not consumer.flow_active:
        chain.broken()
        return  # dropped, as Faust drops messages of an earlier generation
    queued = put(generation, batch, skips)
    waited = await consumer.wait_first(queued, consumer.suspend_flow.wait())
    if queued not in waited.done:  # flow suspended first: the put was cancelled, the records dropped
        chain.broken()


# -- offset bookkeeping (feed.py) ----------------------------------------------------------

def track_unacked(consumer: Any, token: Any) -> None:
    """Put `token` in the consumer's set of unacked messages (a WeakSet that Faust's
    `wait_empty` waits on before it commits at a rebalance or a stop)."""
    consumer._unacked_messages.add(token)


def ack_offsets(consumer: Any, offsets: Mapping[TP, Iterable[int]], token: Any) -> None:
    """What `Consumer.ack` does for a message, for each offset of each tp, then for
    `token` as the message: its offsets are committed with Faust's next commit.

    Per tp in whole sets rather than offset by offset (a batch acks ~1,000 offsets): the
    same offsets end up in `_acked_index` and `_acked` (the new ones, each once, those
    below the committed offset left out) and `_n_acked` counts them; `_acked` is sorted
    by Faust's commit before it is read."""
    committed_of = consumer._committed_offset
    acked_index = consumer._acked_index
    n = 0
    with ack_lock:
        for tp, offs in offsets.items():
            committed = committed_of[tp]
            fresh = set(offs) if committed is None else {o for o in offs if o >= committed}
            index = acked_index[tp]
            fresh -= index
            if fresh:
                index |= fresh
                consumer._acked[tp] += sorted(fresh)
                n += len(fresh)
        consumer._n_acked += n
        if token is not None:
            token.acked = True
            consumer._unacked_messages.discard(token)
            waiter = consumer._waiting_for_ack
            if waiter is not None and not waiter.done():
                waiter.set_result(None)


def add_gap(consumer: Any, tp: TP, first: int, last: int) -> None:
    """Count offsets first..last (inclusive) of `tp` as done, for offsets this consumer
    never delivered (transaction markers, records gone from a compacted topic; found by
    continuity.py).

    They are acked like delivered offsets. Faust's own `_add_gap` keeps an interval tree
    and merges it on every call, quadratic in the gaps between two commits: with a
    transactional upstream (a marker after every transaction) 10-event transactions cost
    16x the CPU per event of a plain upstream (benchmarks/README.md, transactional)."""
    ack_offsets(consumer, {tp: range(first, last + 1)}, None)


def committed_offset(consumer: Any, tp: TP) -> int | None:
    """The offset Faust last committed for `tp` (the next to read), None when none yet
    or the partition is not assigned here."""
    return consumer._committed_offset.get(tp)


# -- the table and the fetcher ---------------------------------------------------------------

def db_for_partition(table: Any, partition: int) -> Any:
    """The RocksDB database (rocksdict) of the table's `partition`."""
    return table.data._db_for_partition(partition)


def open_partitions(table: Any) -> list[int]:
    """The table partitions whose RocksDB database is open (those assigned here); Faust
    drops a revoked partition's database from this mapping."""
    return sorted(table.data._dbs)


def set_fetch_max_wait(consumer: Any, fetch_max_wait_ms: int) -> None:
    """The running aiokafka consumer's fetch max wait (Faust fixes it at 1500 ms)."""
    consumer._thread._ensure_consumer()._fetcher._fetch_max_wait_ms = fetch_max_wait_ms


def read_committed(consumer: Any) -> None:
    """Make the aiokafka consumer Faust builds read with isolation level read_committed.

    Faust reads read_committed only in its exactly-once mode; with read_uncommitted, the
    records of an upstream's aborted transactions would be applied. Set before the
    consumer starts (its fetcher takes the level at start)."""
    thread = consumer._thread
    create = thread._create_consumer

    def create_read_committed(loop: Any) -> Any:
        client = create(loop=loop)
        client._isolation_level = "read_committed"
        return client

    thread._create_consumer = create_read_committed


def stop_despite_fetch_backoff(consumer: Any) -> None:
    """Let the aiokafka consumer Faust builds stop while a broker is down.

    aiokafka's `Fetcher.close` cancels its pending fetch tasks and awaits each: a task
    cancelled in its retry backoff (its leader's broker unreachable) re-raises the
    CancelledError out of `close`, which ends Faust's consumer thread before it signals
    its shutdown, and the worker then waits for it forever on SIGTERM. The pending tasks
    left are cancelled and awaited here instead. Set before the consumer starts."""
    thread = consumer._thread
    create = thread._create_consumer

    def create_stopping(loop: Any) -> Any:
        client = create(loop=loop)
        stop = client.stop

        async def stop_cleanly() -> None:
            fetcher = client._fetcher
            if fetcher is not None:
                fetcher.close = _close_tolerating_backoff(fetcher, fetcher.close)
            await stop()

        client.stop = stop_cleanly
        return client

    thread._create_consumer = create_stopping


def _close_tolerating_backoff(fetcher: Any, close: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    async def close_tolerating_backoff() -> None:
        try:
            await close()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the stop itself was cancelled
            pending = list(fetcher._pending_tasks)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            log.info("consumer stopped with %d fetches cancelled in their retry backoff", len(pending))

    return close_tolerating_backoff


# -- table recovery (restore.py) ----------------------------------------------------------------

# What a bulk restore gets: per changelog partition (first, last) offsets to apply, a
# check that the rebalance it runs for is still current, and a time.monotonic() deadline;
# it returns per partition the last offset it wrote (with the persisted offset).
BulkRestore = Callable[[dict[int, tuple[int, int]], Callable[[], bool], float], Awaitable[dict[int, int]]]


def restore_before_recovery(app: Any, table: Any, restore: BulkRestore) -> None:
    """Run `restore` for the table's active changelog partitions each time Faust's
    recovery has read their offsets (the persisted ones) and high watermarks, before it
    seeks its consumer there; the offsets `restore` reached become Faust's start, so its
    own reader only reads what is left (nothing when the restore completed).

    The hook wraps `Recovery._build_offsets` for the active partitions (after the high
    watermarks, before the seek). Faust runs that step under `broker_request_timeout`
    and stops its recovery service when a step overruns, so the restore gets at most 3/4
    of it; what it leaves, Faust reads as before."""
    recovery = app.tables.recovery
    build = recovery._build_offsets
    topic = table.changelog_topic.get_topic_name()
    budget = 0.75 * float(app.conf.broker_request_timeout)

    async def build_then_restore(consumer: Any, tps: Any, destination: Any, title: str) -> None:
        await build(consumer, tps, destination, title)
        if title != "active":
            return
        start = time.monotonic()
        highwaters = recovery.active_highwaters  # Faust's: the last offset (high watermark - 1)
        # Every active partition, those with nothing to read too (restore.py logs them).
        spans = {tp.partition: (destination[tp] + 1, highwaters[tp]) for tp in tps
                 if tp.topic == topic and destination.get(tp) is not None and highwaters.get(tp) is not None}
        generation = app.consumer_generation_id

        def keep_going() -> bool:
            return (app.consumer_generation_id == generation and not recovery.signal_recovery_start.is_set()
                    and not recovery.should_stop)

        # Faust's changelog reader keeps running beside the restore, and applies what it
        # takes from its queue later, in buffers. Events it took already are applied now,
        # before the restore writes newer ones; the queue's events were fetched before the
        # rebalance (Faust drops them too, when the flow resumes).
        recovery.flush_buffers()
        app.tables.changelog_queue.clear()
        applied = await restore(spans, keep_going, start + budget)
        for partition, offset in applied.items():
            tp = TP(topic, partition)
            if offset > destination[tp]:
                destination[tp] = offset
        _drop_restored(recovery, topic, applied)

    recovery._build_offsets = build_then_restore


def _drop_restored(recovery: Any, topic: str, applied: dict[int, int]) -> None:
    """Drop the changelog events Faust's reader took while the restore ran (one still on
    its way into the queue when the rebalance began) that the restore has applied: they
    are older than what it wrote after them, and would otherwise be applied over it."""
    for buf in recovery.buffers.values():
        buf[:] = [e for e in buf if e.message.topic != topic
                  or e.message.offset > applied.get(e.message.partition, -1)]
