"""The worker's batch pipeline: from a batch of input records to vectors on the output
topic, states in the table, and the events acked.

A batch goes through two stages:
- `apply`: fill the batch's holes (continuity.py), one engine call, send the outputs;
- `commit` (in the store loop): once the outputs are acknowledged, write the states,
  flush the changelog, ack the events.
With `pipeline_depth` > 0, later batches are applied while earlier ones wait for
`commit`; they see the earlier batches' states through `PendingStates`.

Any error in either stage ends the process (`fail_stop`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
from faust.types import TP

from clickvec.stream.worker import faust_internals
from clickvec.stream.worker.config import StreamConfig
from clickvec.stream.worker.continuity import Continuity
from clickvec.stream.worker.engine import BatchResult, Engine, PendingStates, Record, StateStore
from clickvec.stream.worker.feed import Batch, BatchFeed
from clickvec.stream.worker.metrics import Metrics
from clickvec.stream.worker.sink import Sink
from clickvec.stream.worker.state import is_erased

log = logging.getLogger(__name__)

# The tail-hole sweep runs only once no batch has been applied for this long.
IDLE_BEFORE_SWEEP_S = 2.0
# How often erased markers are checked against the committed offsets when no batch comes.
MARKER_CHECK_S = 1.0
ERASED_LOG_S = 30.0  # at most one log line this often about forgotten and expired users


def fail_stop(exc: BaseException) -> NoReturn:
    """End the process at once when a batch cannot be applied and stored (its outputs
    refused, ONNX Runtime failing, a hole that cannot be read back, ...).

    Faust's own handling of a crashed agent, restarting it in this process or stopping
    the app gracefully, acks events the crashed agent had taken, so their offsets get
    committed although they were never applied (tests/test_stream_e2e.py refuses the
    output topic). Exiting before anything else runs leaves every unacked event to the
    next start, exactly as after a SIGKILL, which the crash test covers; the group
    notices the departure at its session timeout."""
    log.critical("stopping the worker: %s: %s (the events not yet acked are processed again at the next "
                 "start)", type(exc).__name__, exc, exc_info=exc)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(70)


def fail_stopping(fn: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """`fn` (a Faust timer or task) with any error ending the process (`fail_stop`):
    an exception raised in a timer bypasses it (the timer dies, or Faust stops the app
    gracefully and acks what was in flight)."""

    @functools.wraps(fn)
    async def run() -> None:
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            fail_stop(exc)

    return run


@dataclass(slots=True)
class InFlight:
    """A batch that is applied (outputs sent) and waits for `Pipeline.commit`."""

    number: int
    batch: Batch | None  # None: records read back by the tail-hole sweep, not from the feed
    records: list[Record]
    result: BatchResult
    delivered: Awaitable[None]  # resolves once the brokers acknowledged every output
    t0: float  # perf_counter when the batch was taken


class Pipeline:
    """The batch pipeline (see the module docstring). `app` is the Faust app, for its
    consumer (assignment, positions, generation) and its rebalancing flag."""

    def __init__(self, app: Any, cfg: StreamConfig, engine: Engine, store: StateStore, sink: Sink,
                 continuity: Continuity, feed: BatchFeed, metrics: Metrics,
                 on_fatal: Callable[[BaseException], Any] = fail_stop) -> None:
        self.app = app
        self.cfg = cfg
        self.engine = engine
        self.store = store
        self.sink = sink
        self.continuity = continuity
        self.feed = feed
        self.metrics = metrics
        self.on_fatal = on_fatal
        self.pending = PendingStates(store)
        self.inflight: asyncio.Queue[InFlight] = asyncio.Queue(maxsize=max(1, cfg.pipeline_depth))
        self.applying = asyncio.Lock()
        self.batches = 0  # batches applied
        self.last_batch = time.monotonic()
        self.storer: asyncio.Future[None] | None = None
        self.erasing: list[tuple[str, bytes, Record]] = []  # erased markers stored, to delete (drop_markers)
        self.forgotten = self.evicted = 0  # users forgotten by tombstones, states expired by the TTL
        self._erased_logged = -ERASED_LOG_S

    # -- the agent -----------------------------------------------------------------------

    async def run(self, on_first_batch: Callable[[], None]) -> None:
        """The agent's body: apply the feed's batches while the store loop commits them."""
        storer = self.storer = asyncio.ensure_future(self.store_loop())
        first = True
        try:
            async for batch in self.feed.batches():
                t0 = time.perf_counter()
                if first:
                    on_first_batch()
                    first = False
                self.feed.track(batch)
                await self.apply(batch, batch.records, t0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.on_fatal(exc)
        finally:
            if not storer.done():
                storer.cancel()

    async def apply(self, batch: Batch | None, records: list[Record], t0: float) -> None:
        """Fill the holes, process, send the outputs, and queue the batch for `commit`."""
        async with self.applying:
            await self._apply_held(batch, records, t0)

    async def _apply_held(self, batch: Batch | None, records: list[Record], t0: float) -> None:
        """`apply`, with `applying` held by the caller."""
        skips = batch.skips if batch is not None else None
        records = await self.continuity.complete(records, self.app.consumer_generation_id, skips)
        result = self.engine.process(records, self.pending)
        self.batches += 1
        self.pending.hold(result, self.batches)
        delivered = self.sink.send(result.outputs, result.dead, asyncio.get_running_loop(), result.latest)
        # The store loop never stops with an error (it ends the process), so waiting
        # on it cannot hang.
        await self.inflight.put(InFlight(self.batches, batch, records, result, delivered, t0))
        if self.cfg.pipeline_depth == 0:  # one batch at a time
            await self.inflight.join()
        self.last_batch = time.monotonic()

    # -- the store loop ------------------------------------------------------------------

    async def store_loop(self) -> None:
        getter: asyncio.Future[InFlight] | None = None
        try:
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(self.inflight.get())
                if self.erasing:  # markers wait for their offsets' commit, even with no new batch
                    # (asyncio.wait, unlike wait_for, never cancels the get: no batch is lost)
                    done, _ = await asyncio.wait({getter}, timeout=MARKER_CHECK_S)
                    if not done:
                        await self.drop_markers()
                        continue
                item = await getter
                getter = None
                await self.commit(item)
                self.inflight.task_done()
                self._count(item)
                if self.erasing:
                    await self.drop_markers()
        except asyncio.CancelledError:
            if getter is not None:
                getter.cancel()
            raise
        except Exception as exc:
            self.on_fatal(exc)

    async def commit(self, item: InFlight) -> None:
        """Make an applied batch durable. The order is what makes a crash at any point
        lose nothing and apply nothing twice:

        1. Wait until the brokers acknowledged the batch's outputs (vectors and dead
           letters): a stored state says its events' vectors were published.
        2. Write the states (RocksDB, and the changelog records sent).
        3. Flush the changelog: wait until the brokers hold every state record (a worker
           that takes the partitions over recovers the states from there). The states are
           in the store now: drop them from the pending ones.
        4. Ack the batch's events: Faust commits their offsets with its next commit.

        A crash before step 4 leaves the events unacked: they come back at the next start,
        and the engine skips the ones the stored state already holds."""
        await item.delivered  # 1
        self.engine.commit_states(item.result, self.store)  # 2
        await self.store.flush()  # 3
        self.pending.release(item.result, item.number)
        if item.batch is not None:  # 4
            self.feed.ack(item.batch, item.records)
        self.erasing += [(uid, v, rec) for uid, v, rec in item.result.states if v is not None and is_erased(v)]

    async def drop_markers(self) -> None:
        """Delete the erased markers (engine.py) whose tombstone's offset is committed:
        no event before it can come back any more, so the marker has nothing left to
        guard, and the user's id leaves the table and (compacted) the changelog.

        A marker a later batch replaced (the user came back) or holds is left as it is.
        The list is in memory: after a crash the markers of the last seconds stay until
        the user's next event or the state TTL."""
        consumer = self.app.consumer
        assigned = consumer.assignment()
        done: list[tuple[str, bytes | None, Record]] = []
        keep = []
        for uid, marker, rec in self.erasing:
            tp = TP(self.cfg.in_topic, rec.partition)
            if tp not in assigned:  # moved to another worker: its marker stays to the TTL
                continue
            committed = faust_internals.committed_offset(consumer, tp)
            if committed is None or committed <= rec.offset:
                keep.append((uid, marker, rec))
            elif not self.pending.holds(uid) and self.store.get(uid, rec) == marker:
                done.append((uid, None, rec))
        self.erasing = keep
        if done:
            self.store.put_many(done)
            await self.store.flush()
            log.info("%d erased markers deleted (their tombstones' offsets are committed)", len(done))

    def _count(self, item: InFlight) -> None:
        m, result, records = self.metrics, item.result, item.records
        now = time.time()
        m.events_in.inc(len(records))
        m.events_applied.inc(result.applied)
        m.vectors_out.inc(len(result.outputs))
        m.replayed.inc(result.replayed)
        m.state_resets.inc(result.state_resets)
        self.forgotten += result.forgotten
        self.evicted += result.evicted
        if (result.forgotten or result.evicted) and time.monotonic() - self._erased_logged >= ERASED_LOG_S:
            self._erased_logged = time.monotonic()
            log.info("so far %d users forgotten by tombstones, %d states expired (state TTL)", self.forgotten,
                     self.evicted)
        for _, _, reason in result.dead:
            m.dead.labels(reason).inc()
        m.batch_size.observe(len(records))
        m.infer_seconds.observe(result.infer_s)
        m.batch_seconds.observe(time.perf_counter() - item.t0)
        m.users.set(result.users)
        if result.event_ts:
            m.latency.observe_many(np.maximum(0.0, now - np.asarray(result.event_ts, np.float64) / 1000.0))

    # -- timers --------------------------------------------------------------------------

    async def _positions(self) -> dict[Any, int]:
        """The consumer's position in each assigned input partition (those fetched)."""
        consumer = self.app.consumer
        positions = {}
        for tp in consumer.assignment():
            if tp.topic != self.cfg.in_topic:
                continue
            try:
                pos = await consumer.position(tp)
            except Exception:  # not fetched yet
                continue
            if pos is not None:
                positions[tp] = pos
        return positions

    def _idle(self) -> bool:
        storer = self.storer
        return (storer is not None and not storer.done() and not self.app.rebalancing and self.feed.idle()
                and time.monotonic() - self.last_batch >= IDLE_BEFORE_SWEEP_S)

    async def sweep_tail_holes(self) -> None:
        """Records fetched and then dropped at the end of a partition (nothing after them
        arrives to reveal the hole): when the agent has been idle for a while and the
        records the consumer returned reach past the next offset to apply, read the rest
        back and apply it.

        The sweep holds `applying` throughout, so no batch is applied meanwhile, and
        reads back only up to what the consumer returned and the feed no longer holds
        (`BatchFeed.fetched_to`, `idle`): records still on their way are not read twice.
        An error ends the process (`on_fatal`), as in the agent: raised in a timer, it
        would bypass fail-stop."""
        try:
            if self.applying.locked() or not self._idle():
                return
            async with self.applying:
                positions = await self._positions()
                if not self._idle():  # a fetch came in while the positions were read
                    return
                fetched = self.feed.fetched_to
                ends = {tp.partition: min(pos, fetched[tp.partition])
                        for tp, pos in positions.items() if tp.partition in fetched}
                records = await self.continuity.tail(ends, self.app.consumer_generation_id)
                if records:
                    await self._apply_held(None, records, time.perf_counter())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.on_fatal(exc)

    async def report_lag(self) -> None:
        """Messages behind the high watermark, per assigned input partition."""
        try:
            await self._report_lag()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.on_fatal(exc)

    async def _report_lag(self) -> None:
        consumer = self.app.consumer
        for tp, pos in (await self._positions()).items():
            try:
                hw = consumer.highwater(tp)
            except Exception:  # not yet fetched
                continue
            if hw is not None:
                self.metrics.lag.labels(str(tp.partition)).set(max(0, hw - pos))
