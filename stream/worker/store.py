"""Where per-user state values live, behind one small interface: `StateStore`, with a
dict (`MemoryStateStore`), the Faust table (table.py: RocksDB + changelog) and the
states of batches not yet stored (`PendingStates`) as implementations."""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

from clickvec.stream.worker.state import last_ts_of

if TYPE_CHECKING:
    from clickvec.stream.worker.engine import BatchResult


class Record(NamedTuple):
    """One consumed Kafka message. A NamedTuple, not a dataclass: one is built per input
    record, and a NamedTuple costs about a third as much to build."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int


class StateStore(abc.ABC):
    """Where per-user state values live. `record` is the event whose partition owns the key."""

    @abc.abstractmethod
    def get(self, user_id: str, record: Record) -> bytes | None: ...

    @abc.abstractmethod
    def put(self, user_id: str, value: bytes, record: Record) -> None: ...

    def delete(self, user_id: str, record: Record) -> None:
        """Delete the user's value (a forgotten or expired user). Not abstract, so that
        stores written before deletes existed still load; they cannot forget."""
        raise NotImplementedError(f"{type(self).__name__} cannot delete states")

    def get_many(self, keys: list[tuple[str, Record]]) -> list[bytes | None]:
        """`get` of several (user_id, record) keys; stores that can read in bulk do."""
        get = self.get
        return [get(user_id, record) for user_id, record in keys]

    def put_many(self, states: Iterable[tuple[str, bytes | None, Record]]) -> None:
        """Write several (user_id, value, record) states, a None value deleting the
        user's; stores that can batch writes do."""
        for user_id, value, record in states:
            if value is None:
                self.delete(user_id, record)
            else:
                self.put(user_id, value, record)

    def expired(self, cutoff_ts: int, budget: int) -> list[tuple[str, int, bytes]]:
        """Stored values whose last event time is before `cutoff_ts`, as (user_id,
        partition, value), found by examining at most `budget` values from where the
        previous call stopped (bounded work per call). Stores that cannot scan find none."""
        return []


class MemoryStateStore(StateStore):
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self._cursor = 0

    def get(self, user_id: str, record: Record) -> bytes | None:
        return self.data.get(user_id)

    def put(self, user_id: str, value: bytes, record: Record) -> None:
        self.data[user_id] = value

    def delete(self, user_id: str, record: Record) -> None:
        self.data.pop(user_id, None)

    def expired(self, cutoff_ts: int, budget: int) -> list[tuple[str, int, bytes]]:
        keys = list(self.data)
        if self._cursor >= len(keys):
            self._cursor = 0
        seen = keys[self._cursor:self._cursor + budget]
        self._cursor += len(seen)
        return [(k, 0, v) for k in seen if (ts := last_ts_of(v := self.data[k])) is not None and ts < cutoff_ts]


class PendingStates(StateStore):
    """States of batches that are processed but not yet stored (their outputs are still
    on the way to the brokers), seen by the batches processed after them.

    `hold` makes a batch's states visible; `release` drops them once the batch's states
    are in `base` (unless a later batch has replaced them)."""

    def __init__(self, base: StateStore) -> None:
        self.base = base
        self._pending: dict[str, tuple[bytes | None, int]] = {}  # None: deleted

    def get(self, user_id: str, record: Record) -> bytes | None:
        held = self._pending.get(user_id)
        return held[0] if held is not None else self.base.get(user_id, record)

    def put(self, user_id: str, value: bytes, record: Record) -> None:
        self.base.put(user_id, value, record)

    def delete(self, user_id: str, record: Record) -> None:
        self.base.delete(user_id, record)

    def expired(self, cutoff_ts: int, budget: int) -> list[tuple[str, int, bytes]]:
        # A held user has a newer value than the store's (or is deleted already).
        pending = self._pending
        return [e for e in self.base.expired(cutoff_ts, budget) if e[0] not in pending]

    def holds(self, user_id: str) -> bool:
        """Whether a batch not yet stored changes the user's value."""
        return user_id in self._pending

    def hold(self, result: BatchResult, batch: int) -> None:
        for uid, value, _ in result.states:
            self._pending[uid] = (value, batch)

    def release(self, result: BatchResult, batch: int) -> None:
        for uid, _, _ in result.states:
            held = self._pending.get(uid)
            if held is not None and held[1] == batch:
                del self._pending[uid]

    def __len__(self) -> int:
        return len(self._pending)
