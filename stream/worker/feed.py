"""The worker's intake: input records in whole batches, straight from Faust's consumer.

Faust hands over each message on its own. Its drain loop awaits
`wait_first(callback(message), suspend_flow.wait())` per message (two tasks and a wait
per event), the conductor tracks and decodes it, and the stream's queue and iterator
pass it on one at a time. On this 2-core machine that path took about 45% of the
worker's event loop, more than the model did (benchmarks/results/profile_round2.txt).

`BatchFeed` replaces the consumer's drain loop. Input-topic records go to the agent as
whole lists, once per fetch. Records of any other topic (table changelogs during
recovery) still take Faust's own path, message by message.

Faust keeps everything else:
- the group, the assignment and the seeks;
- table recovery;
- offset commits (`ack` fills the same bookkeeping `Consumer.ack` fills);
- waiting for in-flight work at a rebalance: each batch being applied is tracked in the
  consumer's set of unacked messages, like one message.

A batch fetched under an earlier consumer generation, or while flow is stopped, is
dropped, as Faust drops such messages. After the rebalance Faust seeks back to the
committed offsets; any record skipped over anyway is read back by `stream.continuity`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from clickvec.stream.worker.engine import Record
from faust.types import TP

log = logging.getLogger(__name__)

try:  # the lock `Consumer.ack` takes (faust-streaming >= 0.12)
    from faust.transport.consumer import ack_lock as _ack_lock
except ImportError:  # pragma: no cover - older layout: acks come from the event loop only
    import threading

    _ack_lock = threading.RLock()


class BatchToken:
    """A batch being applied, in the consumer's set of unacked messages (a WeakSet that
    Faust's `wait_empty` waits on before it commits at a rebalance or a stop)."""

    __slots__ = ("acked", "refcount", "size", "__weakref__")

    def __init__(self, size: int) -> None:
        self.acked = False
        self.refcount = 1
        self.size = size

    def __repr__(self) -> str:
        return f"<batch of {self.size} records, acked={self.acked}>"


class Batch:
    __slots__ = ("records", "token")

    def __init__(self, records: list[Record]) -> None:
        self.records = records
        self.token: BatchToken | None = None


class BatchFeed:
    """Batches of input records for the agent (see the module docstring).

    `install(consumer)` replaces the consumer's drain loop; `batches()` yields the records
    fetched so far, up to `max_batch`, waiting up to `max_wait` seconds for more to make
    a batch fuller; `track` and `ack` tie a batch into Faust's offset bookkeeping."""

    def __init__(self, app: Any, topic: str, max_batch: int, max_wait: float, queued_fetches: int = 16) -> None:
        self.app = app
        self.topic = topic
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait)
        self._fetches: asyncio.Queue[tuple[int, list[Record]]] = asyncio.Queue(maxsize=queued_fetches)
        self._tps: dict[int, TP] = {}

    # -- the consumer side -------------------------------------------------------------

    def install(self, consumer: Any) -> None:
        async def drain_messages(fetcher: Any) -> None:
            await self._drain(consumer, fetcher)

        consumer._drain_messages = drain_messages

    def idle(self) -> bool:
        return self._fetches.empty()

    async def _drain(self, consumer: Any, fetcher: Any) -> None:
        """Faust's `Consumer._drain_messages`, with the input topic's records queued
        as one list per fetch."""
        app = self.app
        topic = self.topic
        callback = consumer.callback
        consumer_stopped = consumer._stopped.is_set
        fetcher_stopped = fetcher._stopped.is_set
        read_offset = consumer._read_offset
        to_message = consumer._to_message
        commit_every = consumer._commit_every
        while not (consumer_stopped() or fetcher_stopped()):
            records, active = await consumer._wait_next_records(1.0)
            generation = app.consumer_generation_id
            await asyncio.sleep(0)
            if not records or consumer.should_stop:
                continue
            if not consumer.flow_active:
                # As Faust's `getmany`: what was fetched while flow stopped is dropped
                # and the partitions go back to their committed offsets.
                try:
                    await consumer.perform_seek()
                except Exception as exc:  # noqa: BLE001 - Faust logs and goes on too
                    log.warning("seek to committed offsets while flow stopped: %s", exc)
                continue
            buffered = consumer._buffered_partitions
            batch: list[Record] = []
            others: list[tuple[TP, list[Any]]] = []
            for tp, recs in records.items():
                if active is not None and tp not in active and tp not in buffered:
                    continue
                if tp.topic != topic:
                    others.append((tp, recs))
                    continue
                partition = tp.partition
                floor = read_offset[tp]
                for r in recs:
                    if floor is None or r.offset >= floor:
                        batch.append(Record(r.key, r.value, topic, partition, r.offset))
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
                continue
            if app.consumer_generation_id != generation or not consumer.flow_active:
                continue  # dropped, as Faust drops messages of an earlier generation
            await consumer.wait_first(self._fetches.put((generation, batch)), consumer.suspend_flow.wait())

    # -- the agent side ----------------------------------------------------------------

    async def batches(self) -> AsyncIterator[Batch]:
        loop = asyncio.get_running_loop()
        fetches = self._fetches
        left: list[Record] = []
        left_generation = -1
        while True:
            if left:
                generation, records, left = left_generation, left, []
            else:
                generation, records = await fetches.get()
            deadline = loop.time() + self.max_wait
            while len(records) < self.max_batch:
                if fetches.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        more_generation, more = await asyncio.wait_for(fetches.get(), remaining)
                    except TimeoutError:
                        break
                else:
                    more_generation, more = fetches.get_nowait()
                if more_generation != generation:  # the earlier ones are stale
                    generation, records = more_generation, more
                else:
                    records.extend(more)
            if len(records) > self.max_batch:
                left, left_generation = records[self.max_batch:], generation
                del records[self.max_batch:]
            if generation != self.app.consumer_generation_id or not self.app.consumer.flow_active:
                continue
            yield Batch(records)

    def track(self, batch: Batch) -> None:
        """Count the batch as in flight: a rebalance or a stop waits until it is acked."""
        # The batch holds the token until it is acked: the WeakSet keeps it that long.
        batch.token = BatchToken(len(batch.records))
        self.app.consumer._unacked_messages.add(batch.token)

    def ack(self, batch: Batch, records: list[Record]) -> None:
        """Mark the offsets of `records` done (Faust commits them with its next commit)."""
        consumer = self.app.consumer
        committed_of = consumer._committed_offset
        tps = self._tps
        n = 0
        with _ack_lock:
            for rec in records:
                tp = tps.get(rec.partition)
                if tp is None:
                    tp = tps[rec.partition] = TP(self.topic, rec.partition)
                committed = committed_of[tp]
                offset = rec.offset
                if committed is None or offset >= committed:
                    index = consumer._acked_index[tp]
                    if offset not in index:
                        index.add(offset)
                        consumer._acked[tp].append(offset)
                        n += 1
            consumer._n_acked += n
            token = batch.token
            if token is not None:
                token.acked = True
                consumer._unacked_messages.discard(token)
                waiter = consumer._waiting_for_ack
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
