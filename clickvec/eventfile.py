"""Event files: Parquet, JSONL (one contract JSON object per line) and CSV, by suffix;
plus the plain `user item` sequence format of the sequential-recommendation literature.

Every reader returns the same schema (`EVENT_SCHEMA`, extra columns such as `label`
kept after it), so the trainer does not care which format a dump came in.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from clickvec.contract.events import REQUIRED_FIELDS, ClickEvent, EventError, parse_event
from clickvec.errors import ClickvecError

EVENT_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("event_type", pa.string()),
        ("ts", pa.int64()),
        ("category", pa.string()),
        ("amount", pa.float64()),
        ("session_id", pa.string()),
    ]
)
FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
}
_BATCH_ROWS = 64 * 1024


class EventFileError(ClickvecError):
    """An event file that cannot be read as click events.

    Action: fix the file (or its producer); the message names the file, and the column
    or line at fault.
    """


def file_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise EventFileError(
            f"{path}: unknown event file suffix {suffix!r}; use one of {sorted(FORMATS)}"
        )
    return FORMATS[suffix]


# --------------------------------------------------------------------------- writing


def events_to_table(events: Iterable[ClickEvent]) -> pa.Table:
    cols: dict[str, list[Any]] = {f.name: [] for f in EVENT_SCHEMA}
    for e in events:
        cols["user_id"].append(e.user_id)
        cols["item_id"].append(e.item_id)
        cols["event_type"].append(e.event_type)
        cols["ts"].append(e.ts)
        cols["category"].append(e.category)
        cols["amount"].append(e.amount)
        cols["session_id"].append(e.session_id)
    return pa.table(cols, schema=EVENT_SCHEMA)


def write_events(events: Iterable[ClickEvent] | pa.Table, path: str | Path) -> Path:
    """Write events (or a table in `EVENT_SCHEMA`, extra columns kept) by file suffix."""
    path = Path(path)
    fmt = file_format(path)
    table = events if isinstance(events, pa.Table) else events_to_table(events)
    table = normalize_table(table, source=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "csv":
        pacsv.write_csv(table, path)
    else:
        with open(path, "w", encoding="utf-8") as f:
            for batch in table.to_batches(_BATCH_ROWS):
                names = batch.schema.names
                cols = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
                for row in zip(*cols, strict=True):
                    obj = {k: v for k, v in zip(names, row, strict=True) if v is not None}
                    f.write(json.dumps(obj, separators=(",", ":"), allow_nan=False))
                    f.write("\n")
    return path


# --------------------------------------------------------------------------- reading


def normalize_table(table: pa.Table, source: str = "table") -> pa.Table:
    """Cast to `EVENT_SCHEMA` (optional columns added as nulls), extra columns kept after.

    Raises `EventFileError` naming a missing required column or a null in one.
    """
    n = table.num_rows
    names = table.schema.names
    cols: dict[str, pa.ChunkedArray | pa.Array] = {}
    for f in EVENT_SCHEMA:
        if f.name not in names:
            if f.name in REQUIRED_FIELDS:
                raise EventFileError(
                    f"{source}: missing required column {f.name!r} (has {names}); "
                    f"event files need {list(REQUIRED_FIELDS)}"
                )
            cols[f.name] = pa.nulls(n, f.type)
            continue
        col = table.column(f.name)
        if f.name in REQUIRED_FIELDS and col.null_count:
            if col.null_count == n:
                raise EventFileError(
                    f"{source}: missing required column {f.name!r} (all values null)"
                )
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise EventFileError(f"{source}: required column {f.name!r} is null at row {row}")
        if col.type != f.type:
            try:
                col = (
                    col.cast(f.type)
                    if f.name != "ts" or not pa.types.is_floating(col.type)
                    else _float_ts(col, source)
                )
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise EventFileError(
                    f"{source}: column {f.name!r} of type {col.type} is not {f.type}: {e}"
                ) from None
        cols[f.name] = col
    for name in names:
        if name not in cols:
            cols[name] = table.column(name)
    return pa.table(cols)


def _float_ts(col: pa.ChunkedArray, source: str) -> pa.ChunkedArray:
    v = col.to_numpy()
    if not np.all(np.isfinite(v)) or np.any(v != np.floor(v)):
        raise EventFileError(f"{source}: column 'ts' must hold whole epoch milliseconds")
    return pa.chunked_array([pa.array(v.astype(np.int64))])


def _csv_convert(path: Path) -> pacsv.ConvertOptions:
    # Ids stay strings even when they look like numbers; empty cells are nulls.
    with open(path, encoding="utf-8") as f:
        header = next(csv.reader([f.readline()]), [])
    types = {f.name: f.type for f in EVENT_SCHEMA if f.name in header}
    for name in header:
        if name not in types:
            types[name] = pa.string()
    return pacsv.ConvertOptions(column_types=types, strings_can_be_null=True)


def _jsonl_parse() -> pajson.ParseOptions:
    return pajson.ParseOptions(explicit_schema=EVENT_SCHEMA, unexpected_field_behavior="infer")


def read_table(path: str | Path) -> pa.Table:
    """Read a Parquet, JSONL or CSV event file into `EVENT_SCHEMA` (+ extra columns)."""
    path = Path(path)
    fmt = file_format(path)
    if not path.exists():
        raise EventFileError(f"{path}: no such event file")
    try:
        if fmt == "parquet":
            table = pq.read_table(path)
        elif fmt == "csv":
            table = pacsv.read_csv(path, convert_options=_csv_convert(path))
        else:
            if path.stat().st_size == 0:
                return EVENT_SCHEMA.empty_table()
            table = pajson.read_json(path, parse_options=_jsonl_parse())
            # Columns absent from every line come back as all-null: treat as missing.
            table = _drop_absent_required(table)
    except pa.ArrowInvalid as e:
        raise EventFileError(f"{path}: cannot read as {fmt}: {e}") from None
    return normalize_table(table, source=str(path))


def _drop_absent_required(table: pa.Table) -> pa.Table:
    n = table.num_rows
    drop = [c for c in REQUIRED_FIELDS if n and table.column(c).null_count == n]
    return table.drop_columns(drop) if drop else table


def _none_if_nan(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def iter_events(path: str | Path) -> Iterator[ClickEvent]:
    """Stream the file's events in file order, a batch at a time.

    JSONL lines go through the contract parser; a bad line raises `EventFileError` with
    its line number (blank lines are skipped).
    """
    path = Path(path)
    fmt = file_format(path)
    if not path.exists():
        raise EventFileError(f"{path}: no such event file")
    if fmt == "jsonl":
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    yield parse_event(line)
                except EventError as e:
                    raise EventFileError(f"{path}:{lineno}: bad event: {e}") from None
        return
    if fmt == "parquet":
        batches: Iterable[pa.RecordBatch] = pq.ParquetFile(path).iter_batches(
            batch_size=_BATCH_ROWS
        )
    else:
        batches = pacsv.open_csv(path, convert_options=_csv_convert(path))
    start = 0
    for batch in batches:
        t = normalize_table(pa.Table.from_batches([batch]), source=f"{path} (rows from {start})")
        start += t.num_rows
        cols = [t.column(f.name).to_pylist() for f in EVENT_SCHEMA]
        for u, i, et, ts, c, a, s in zip(*cols, strict=True):
            yield ClickEvent(u, i, et, ts, c, _none_if_nan(a), s)


# ------------------------------------------------------------------ sequence format


def sequences_from_table(table: pa.Table) -> dict[str, list[str]]:
    """Per-user item lists ordered by ts (ties keep table order), users in first-seen order."""
    if table.num_rows == 0:
        return {}
    users = table.column("user_id").combine_chunks().dictionary_encode()
    codes = users.indices.to_numpy(zero_copy_only=False)
    ts = table.column("ts").to_numpy()
    order = np.lexsort((np.arange(codes.size), ts, codes))
    items = np.asarray(table.column("item_id").to_pylist(), dtype=object)[order]
    sc = codes[order]
    bounds = np.flatnonzero(np.r_[True, sc[1:] != sc[:-1], True])
    names = users.dictionary.to_pylist()
    return {names[sc[a]]: items[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True)}


def write_sequence_file(
    table: pa.Table, path: str | Path, remap: bool = False
) -> tuple[dict[str, int], dict[str, int]] | None:
    """Write `user item` lines, each user's lines in time order.

    With `remap`, users and items become integers from 1 (in first-seen order, the
    literature's convention) and the (user, item) maps are returned; otherwise the ids
    are written as they are and must contain no whitespace.
    """
    seqs = sequences_from_table(table)
    umap: dict[str, int] = {}
    imap: dict[str, int] = {}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for user, items in seqs.items():
            if remap:
                uid = str(umap.setdefault(user, len(umap) + 1))
                f.writelines(f"{uid} {imap.setdefault(it, len(imap) + 1)}\n" for it in items)
            else:
                if any(ch.isspace() for ch in user) or any(
                    any(ch.isspace() for ch in it) for it in items
                ):
                    raise EventFileError(
                        f"user {user!r} or one of its items has whitespace; use remap=True"
                    )
                f.writelines(f"{user} {it}\n" for it in items)
    return (umap, imap) if remap else None


def read_sequence_file(path: str | Path) -> dict[str, list[str]]:
    """Read `user item` lines (whitespace separated, each user's lines in time order)."""
    seqs: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise EventFileError(f"{path}:{lineno}: expected 'user item', got {line.strip()!r}")
            seqs.setdefault(parts[0], []).append(parts[1])
    return seqs


def table_from_sequences(seqs: dict[str, list[str]], start_ms: int = 1_767_225_600_000) -> pa.Table:
    """Sequences as a table of `view` events one second apart (for sequence-format data)."""
    users, items, ts = [], [], []
    for u, its in seqs.items():
        users += [u] * len(its)
        items += its
        ts += range(start_ms, start_ms + 1000 * len(its), 1000)
    return normalize_table(
        pa.table(
            {
                "user_id": users,
                "item_id": items,
                "event_type": ["view"] * len(items),
                "ts": pa.array(ts, pa.int64()),
            }
        )
    )
