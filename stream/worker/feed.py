"""The worker's intake: input records in whole batches, straight from Faust's consumer.

Faust hands over each message on its own. Its drain loop awaits
`wait_first(callback(message), suspend_flow.wait())` per message (two tasks and a wait
per event), the conductor tracks and decodes it, and the stream's queue and iterator
pass it on one at a time: per event, that path cost more of the worker's event loop
than the model did (benchmarks/README.md).

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
committed offsets; any record skipped over anyway is read back by continuity.py.

The Faust internals this takes are in faust_internals.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from faust.types import TP

from clickvec.stream.worker import faust_internals
from clickvec.stream.worker.engine import Record


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
    """Records to apply; `skips` maps (partition, offset) of a record that follows an
    offset gap the consumer skipped over (nothing readable there) to the offset of the
    record before it (faust_internals.FetchChain)."""

    __slots__ = ("records", "skips", "token")

    def __init__(self, records: list[Record], skips: dict[tuple[int, int], int] | None = None) -> None:
        self.records = records
        self.skips = skips if skips is not None else {}
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
        self._fetches: asyncio.Queue[tuple[int, list[Record], dict[tuple[int, int], int]]] = \
            asyncio.Queue(maxsize=queued_fetches)
        self._tps: dict[int, TP] = {}
        self._in_hand = 0  # fetches returned by the consumer, not yet queued or dropped
        self._holding = False  # `batches` holds records: taken from the queue, not yet applied
        self.fetched_to: dict[int, int] = {}  # per partition, one past the last offset fetched

    # -- the consumer side -------------------------------------------------------------

    def install(self, consumer: Any) -> None:
        """Replace the consumer's drain loop: records of the input topic are queued here."""

        async def drain(fetcher: Any) -> None:
            await faust_internals.drain_batches(self.app, consumer, fetcher, self.topic, self._put,
                                                self._fetched, self._handed)

        faust_internals.replace_drain(consumer, drain)

    def _put(self, generation: int, records: list[Record], skips: dict[tuple[int, int], int]) -> Awaitable[None]:
        return self._fetches.put((generation, records, skips))

    def _fetched(self, ends: dict[int, int]) -> None:
        self._in_hand += 1
        fetched_to = self.fetched_to
        for partition, end in ends.items():
            if end > fetched_to.get(partition, -1):
                fetched_to[partition] = end

    def _handed(self) -> None:
        self._in_hand -= 1

    def idle(self) -> bool:
        """No record on its way to the agent: none returned by the consumer and not yet
        queued, none queued, none taken from the queue and not yet applied."""
        return self._fetches.empty() and self._in_hand == 0 and not self._holding

    # -- the agent side ----------------------------------------------------------------

    async def batches(self) -> AsyncIterator[Batch]:
        loop = asyncio.get_running_loop()
        fetches = self._fetches
        # Records of a fetch beyond the batch taken from it: `left[at:]`. A fetch from a
        # backlog holds tens of thousands of records; slicing its rest off at every batch
        # would copy it over and over.
        left: list[Record] = []
        at = 0
        left_generation = -1
        skips: dict[tuple[int, int], int] = {}
        while True:
            # The agent resumes this generator once it applied the batch yielded last.
            self._holding = at < len(left)
            if at < len(left):
                generation, records = left_generation, left[at:at + self.max_batch]
                at += len(records)
                if at == len(left):
                    left, at = [], 0
            else:
                generation, records, skips = await fetches.get()
                self._holding = True
                skips = dict(skips)
            deadline = loop.time() + self.max_wait
            while len(records) < self.max_batch:
                if fetches.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        more_generation, more, more_skips = await asyncio.wait_for(fetches.get(), remaining)
                    except TimeoutError:
                        break
                else:
                    more_generation, more, more_skips = fetches.get_nowait()
                if more_generation != generation:  # the earlier ones are stale
                    generation, records, skips = more_generation, more, dict(more_skips)
                else:
                    records.extend(more)
                    skips.update(more_skips)
            if len(records) > self.max_batch:
                left, at, left_generation = records, self.max_batch, generation
                records = records[:self.max_batch]
            if generation != self.app.consumer_generation_id or not self.app.consumer.flow_active:
                continue
            yield Batch(records, skips)

    def track(self, batch: Batch) -> None:
        """Count the batch as in flight: a rebalance or a stop waits until it is acked."""
        # The batch holds the token until it is acked: the WeakSet keeps it that long.
        batch.token = BatchToken(len(batch.records))
        faust_internals.track_unacked(self.app.consumer, batch.token)

    def ack(self, batch: Batch, records: list[Record]) -> None:
        """Mark the offsets of `records` done (Faust commits them with its next commit)."""
        per: dict[int, list[int]] = {}
        for _, _, _, partition, offset in records:
            offs = per.get(partition)
            if offs is None:
                per[partition] = [offset]
            else:
                offs.append(offset)
        tps = self._tps
        by_tp = {}
        for partition, offs in per.items():
            tp = tps.get(partition)
            if tp is None:
                tp = tps[partition] = TP(self.topic, partition)
            by_tp[tp] = offs
        faust_internals.ack_offsets(self.app.consumer, by_tp, batch.token)
