"""Feature encoding: event -> model input indices. One definition for trainer and stream.

Index 0 is padding in every feature; index 1 is the out-of-vocabulary bucket for items
and event types, and "no previous event" for the time gap.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import numpy as np

from clickvec.contract.events import EVENT_TYPES

PAD = 0
OOV = 1
FIRST_GAP = 1
N_GAP_BUCKETS = 24  # 0 pad, 1 first event, 2..23 log2-second buckets (last bucket: >= ~12 days)


def gap_bucket(ts_ms: int, prev_ts_ms: int | None) -> int:
    """Log2 bucket of the seconds since the user's previous event (clock skew -> 0 s)."""
    if prev_ts_ms is None or prev_ts_ms < 0:
        return FIRST_GAP
    gap_s = max(0.0, (ts_ms - prev_ts_ms) / 1000.0)
    return 2 + min(N_GAP_BUCKETS - 3, int(math.log2(1.0 + gap_s)))


def gap_buckets(ts_ms: np.ndarray, first_prev_ts_ms: int | None = None) -> np.ndarray:
    """Vectorised `gap_bucket` over one user's time-ordered timestamps."""
    ts = np.asarray(ts_ms, dtype=np.int64)
    if ts.size == 0:
        return np.empty(ts.shape, dtype=np.int64)
    prev = np.empty_like(ts)
    prev[1:] = ts[:-1]
    prev[0] = -1 if first_prev_ts_ms is None else first_prev_ts_ms
    return gap_bucket_array(ts, prev)


def gap_bucket_array(ts_ms: np.ndarray, prev_ts_ms: np.ndarray) -> np.ndarray:
    """`gap_bucket` cell by cell over int64 arrays of one shape (a negative previous
    time: no previous event)."""
    gap_s = np.maximum(0.0, (ts_ms - prev_ts_ms) / 1000.0)
    out = 2 + np.minimum(N_GAP_BUCKETS - 3, np.floor(np.log2(1.0 + gap_s)).astype(np.int64))
    out[prev_ts_ms < 0] = FIRST_GAP
    return out


@dataclass(frozen=True)
class FeatureSpec:
    """How raw ids become indices. Either an explicit item vocabulary (built from the
    training data) or a hash spec (`hash_buckets` > 0) for unbounded catalogues."""

    items: tuple[str, ...] = ()  # items[i] has index i + 2
    hash_buckets: int = 0
    event_types: tuple[str, ...] = EVENT_TYPES
    n_gap_buckets: int = N_GAP_BUCKETS
    _item_index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)
    _type_index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._item_index.update({it: i + 2 for i, it in enumerate(self.items)})
        self._type_index.update({t: i + 2 for i, t in enumerate(self.event_types)})

    @classmethod
    def from_items(cls, items: Iterable[str], min_count: int = 1) -> FeatureSpec:
        counts: dict[str, int] = {}
        for it in items:
            counts[it] = counts.get(it, 0) + 1
        keep = sorted((k for k, c in counts.items() if c >= min_count), key=lambda k: (-counts[k], k))
        return cls(items=tuple(keep))

    @property
    def n_items(self) -> int:
        """Size of the item index space, padding and OOV included."""
        return 2 + (self.hash_buckets if self.hash_buckets else len(self.items))

    @property
    def n_event_types(self) -> int:
        return 2 + len(self.event_types)

    def item_index(self, item_id: str) -> int:
        if self.hash_buckets:
            h = hashlib.blake2b(item_id.encode(), digest_size=8).digest()
            return 2 + int.from_bytes(h, "little") % self.hash_buckets
        return self._item_index.get(item_id, OOV)

    def type_index(self, event_type: str) -> int:
        return self._type_index.get(event_type, OOV)

    def item_indices(self, item_ids: Sequence[str]) -> Iterator[int]:
        """`item_index` of each id, without a Python call per id for a vocabulary."""
        if self.hash_buckets:
            return map(self.item_index, item_ids)
        return map(self._item_index.get, item_ids, repeat(OOV, len(item_ids)))

    def type_indices(self, event_types: Sequence[str]) -> Iterator[int]:
        """`type_index` of each event type."""
        return map(self._type_index.get, event_types, repeat(OOV, len(event_types)))

    def index_to_item(self, idx: int) -> str | None:
        if self.hash_buckets or idx < 2 or idx - 2 >= len(self.items):
            return None
        return self.items[idx - 2]

    def encode_event(self, item_id: str, event_type: str, ts_ms: int, prev_ts_ms: int | None) -> tuple[int, int, int]:
        """(item index, event-type index, gap bucket) of one event."""
        return self.item_index(item_id), self.type_index(event_type), gap_bucket(ts_ms, prev_ts_ms)

    def encode_sequence(
        self, items: Sequence[str], event_types: Sequence[str], ts_ms: Sequence[int] | np.ndarray
    ) -> np.ndarray:
        """One user's time-ordered events -> int64 array [n, 3] of (item, type, gap)."""
        n = len(items)
        out = np.empty((n, 3), dtype=np.int64)
        out[:, 0] = [self.item_index(i) for i in items]
        out[:, 1] = [self.type_index(t) for t in event_types]
        out[:, 2] = gap_buckets(np.asarray(ts_ms, dtype=np.int64))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "items": list(self.items),
            "hash_buckets": self.hash_buckets,
            "event_types": list(self.event_types),
            "n_gap_buckets": self.n_gap_buckets,
            "gap": "0=pad, 1=first event, 2+min(n-3, floor(log2(1+seconds since previous event)))",
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FeatureSpec:
        if d.get("n_gap_buckets", N_GAP_BUCKETS) != N_GAP_BUCKETS:
            raise ValueError("feature spec uses a different number of gap buckets than this clickvec")
        return cls(
            items=tuple(d.get("items", ())),
            hash_buckets=int(d.get("hash_buckets", 0)),
            event_types=tuple(d.get("event_types", EVENT_TYPES)),
        )
