"""Per-user histories from a pyarrow table, an event file or a sequence file.

Sequence files come in two layouts, told apart by the file itself:
- `user item` lines: one event per line, each user's lines in time order;
- one line per user, `user item item ...` (the S3-Rec / ICLRec layout of public data).
A file whose every line has exactly two fields reads as `user item` lines (a one-item user
line means the same thing there); any line with more fields makes it one line per user,
and then a user met on a second line is an error, as is a line with fewer than two fields.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Sequence-format events carry no type or time: they become "view"s one minute apart.
SEQ_EVENT_TYPE = "view"
SEQ_T0_MS = 1_700_000_000_000
SEQ_STEP_MS = 60_000


class SequenceFileError(ValueError):
    """A sequence file that is neither `user item` lines nor one `user item item ...` line per user."""


@dataclass
class History:
    """One user's events in time order (raw ids, as in the source)."""

    user_id: str
    items: list[str]
    types: list[str]
    ts: np.ndarray  # int64 epoch ms, non-decreasing

    def __len__(self) -> int:
        return len(self.items)


def read_sequences(path: str | Path) -> tuple[dict[str, list[str]], str]:
    """A sequence file -> ({user: items in time order}, layout), layout "user-item" or "user-line"."""
    path = Path(path)
    numbered = enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
    rows = [(lineno, parts) for lineno, parts in ((n, line.split()) for n, line in numbered) if parts]
    short = next(((lineno, parts) for lineno, parts in rows if len(parts) < 2), None)
    if short is not None:
        raise SequenceFileError(f"{path}:{short[0]}: expected 'user item' or 'user item item ...', "
                                f"got {short[1][0][:80]!r}")
    if not rows:
        raise SequenceFileError(f"{path}: no events (empty file)")
    seqs: dict[str, list[str]] = {}
    if all(len(p) == 2 for _, p in rows):
        for _, (user, item) in rows:
            seqs.setdefault(user, []).append(item)
        return seqs, "user-item"
    for lineno, (user, *items) in rows:
        if user in seqs:
            raise SequenceFileError(
                f"{path}:{lineno}: user {user!r} already had a line; in the one-line-per-user layout "
                "(detected from lines with several items) each user has one line")
        seqs[user] = items
    return seqs, "user-line"


def histories_from_sequences(seqs: Mapping[str, Sequence[str]]) -> dict[str, History]:
    """Sequence format (user -> time-ordered items) -> histories of one-minute-apart views."""
    out: dict[str, History] = {}
    for u, items in seqs.items():
        n = len(items)
        out[str(u)] = History(
            str(u),
            [str(i) for i in items],
            [SEQ_EVENT_TYPE] * n,
            SEQ_T0_MS + SEQ_STEP_MS * np.arange(n, dtype=np.int64),
        )
    return out


def histories_from_table(table: Any) -> dict[str, History]:
    """pyarrow table with user_id, item_id, event_type, ts -> per-user histories.

    Rows are stably sorted by (user, ts) so equal timestamps keep their file order.
    """
    cols = table.column_names
    for c in ("user_id", "item_id", "ts"):
        if c not in cols:
            raise ValueError(f"event table lacks column {c!r}; it has {cols}")
    users = np.asarray(table.column("user_id").cast("string").to_pylist(), dtype=object)
    items = table.column("item_id").cast("string").to_pylist()
    types = (
        table.column("event_type").cast("string").to_pylist()
        if "event_type" in cols
        else [SEQ_EVENT_TYPE] * len(items)
    )
    ts = np.asarray(table.column("ts").cast("int64").to_numpy(zero_copy_only=False), dtype=np.int64)
    order = np.lexsort((np.arange(len(ts)), ts))
    grouped: dict[str, tuple[list[str], list[str], list[int]]] = {}
    for i in order:
        it, ty, tl = grouped.setdefault(users[i], ([], [], []))
        it.append(items[i])
        ty.append(types[i])
        tl.append(int(ts[i]))
    return {u: History(u, it, ty, np.asarray(tl, dtype=np.int64)) for u, (it, ty, tl) in grouped.items()}


def is_sequence_file(path: str | Path) -> bool:
    """Anything that is not an event file by suffix (.parquet, .jsonl, .csv) is a sequence file."""
    from clickvec.eventfile import FORMATS

    return Path(path).suffix.lower() not in FORMATS


def load_histories(source: Any) -> dict[str, History]:
    """A pyarrow table, a {user: items} mapping, a sequence file or an event file."""
    if isinstance(source, Mapping):
        return histories_from_sequences(source)
    if hasattr(source, "column_names"):
        return histories_from_table(source)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no data at {path}: pass an event file or generate one (clickvec synth)")
    if is_sequence_file(path):
        return histories_from_sequences(read_sequences(path)[0])
    from clickvec import eventfile

    return histories_from_table(eventfile.read_table(path))
