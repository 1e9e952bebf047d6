"""Training data: splits of per-user histories (`training.readers`), encoding and (T, B) batches.

Every event is encoded with the shared `FeatureSpec.encode_sequence`; nothing here
re-implements feature encoding.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clickvec.contract.events import ClickEvent
from clickvec.features import PAD, FeatureSpec
from clickvec.training.readers import SEQ_EVENT_TYPE, History

log = logging.getLogger(__name__)

def synthetic_table(n_users: int, seed: int, n_items: int = 0) -> Any:
    """Synthetic events with planted structure (clickvec.synth)."""
    from clickvec.devtools import synth

    kwargs: dict[str, Any] = {"n_users": n_users, "seed": seed}
    if n_items:
        kwargs["n_items"] = n_items
    return synth.generate_table(synth.SynthConfig(**kwargs))


def event_json_bytes(histories: Mapping[str, History], table: Any = None, sample: int = 20000, seed: int = 0) -> float:
    """Mean JSON bytes of one raw event (the contract's wire form), over a seeded sample."""
    rng = np.random.default_rng(seed)
    if table is not None and table.num_rows:
        idx = np.sort(rng.choice(table.num_rows, size=min(sample, table.num_rows), replace=False))
        rows = table.take(idx).to_pylist()
        total = 0
        for r in rows:
            amount = r.get("amount")
            ev = ClickEvent(
                str(r["user_id"]), str(r["item_id"]), str(r.get("event_type", SEQ_EVENT_TYPE)), int(r["ts"]),
                None if r.get("category") is None else str(r["category"]),
                None if amount is None else float(amount),
                None if r.get("session_id") is None else str(r["session_id"]),
            )
            total += len(ev.to_bytes())
        return total / len(rows)
    hs = list(histories.values())
    total = n = 0
    for _ in range(min(sample, sum(len(h) for h in hs))):
        h = hs[int(rng.integers(len(hs)))]
        j = int(rng.integers(len(h)))
        total += len(ClickEvent(h.user_id, h.items[j], h.types[j], int(h.ts[j])).to_bytes())
        n += 1
    return total / max(n, 1)


# -------------------------------------------------------------------------- splits


@dataclass
class EvalCase:
    """Predict `target` (item, type, log1p gap seconds) from the encoded `inputs` [n, 3]."""

    user: str
    inputs: np.ndarray
    target_item: int
    target_type: int
    target_log_gap: float


@dataclass
class Split:
    """Encoded training sequences and the valid / test cases, all under one FeatureSpec."""

    spec: FeatureSpec
    train: list[np.ndarray]  # per user [n, 4]: item, type, gap, log1p(seconds to next event)
    valid: list[EvalCase]
    test: list[EvalCase]
    kind: str = "loo"
    info: dict[str, Any] = field(default_factory=dict)
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)  # e.g. seeded eval negatives

    @property
    def catalogue(self) -> np.ndarray:
        """Rankable item indices: everything but padding and OOV."""
        return np.arange(2, self.spec.n_items, dtype=np.int64)


def _log_gaps(ts: np.ndarray) -> np.ndarray:
    """log1p(seconds to the next event) per event; the last event has none (NaN)."""
    out = np.full(len(ts), np.nan, dtype=np.float32)
    if len(ts) > 1:
        out[:-1] = np.log1p(np.maximum(0.0, np.diff(ts) / 1000.0))
    return out


def _encode(spec: FeatureSpec, h: History, n: int | None = None) -> np.ndarray:
    n = len(h) if n is None else n
    return spec.encode_sequence(h.items[:n], h.types[:n], h.ts[:n])


def _case(spec: FeatureSpec, h: History, enc: np.ndarray, n_in: int) -> EvalCase:
    gap_s = max(0.0, (int(h.ts[n_in]) - int(h.ts[n_in - 1])) / 1000.0)
    return EvalCase(h.user_id, enc[:n_in], int(enc[n_in, 0]), int(enc[n_in, 1]), float(np.log1p(gap_s)))


def make_split(
    histories: Mapping[str, History],
    kind: str = "loo",
    hash_buckets: int = 0,
    min_item_count: int = 1,
    cutoff_quantile: float = 0.9,
    min_events: int = 3,
) -> Split:
    """Leave-one-out (last = test, second-last = valid, rest = train; users with >= 3 events)
    or time-based (train = events before the cutoff quantile of all timestamps; valid = each
    user's last pre-cutoff event; test = each user's first post-cutoff event)."""
    users = sorted(histories)
    if kind == "loo":
        bounds = {u: (len(histories[u]) - 2 if len(histories[u]) >= min_events else len(histories[u])) for u in users}
    elif kind == "time":
        all_ts = np.concatenate([histories[u].ts for u in users]) if users else np.zeros(0, np.int64)
        cutoff = int(np.quantile(all_ts, cutoff_quantile)) if len(all_ts) else 0
        # Pre-cutoff events; the last of them is the valid target when there are >= 3.
        pre = {u: int(np.searchsorted(histories[u].ts, cutoff, side="left")) for u in users}
        bounds = {u: (pre[u] - 1 if pre[u] >= min_events else pre[u]) for u in users}
    else:
        raise ValueError(f"unknown split {kind!r}")

    if hash_buckets:
        spec = FeatureSpec(hash_buckets=hash_buckets)
    else:
        spec = FeatureSpec.from_items(
            (it for u in users for it in histories[u].items[: bounds[u]]), min_count=min_item_count
        )

    train: list[np.ndarray] = []
    valid: list[EvalCase] = []
    test: list[EvalCase] = []
    for u in users:
        h = histories[u]
        enc = _encode(spec, h)
        b = bounds[u]
        if b >= 2:
            lg = _log_gaps(h.ts[:b])
            train.append(np.concatenate([enc[:b].astype(np.float64), lg[:, None]], axis=1))
        if kind == "loo" and len(h) >= min_events:
            valid.append(_case(spec, h, enc, len(h) - 2))
            test.append(_case(spec, h, enc, len(h) - 1))
        elif kind == "time":
            p = pre[u]
            if p >= min_events:
                valid.append(_case(spec, h, enc, p - 1))
            if p >= 2 and p < len(h):
                test.append(_case(spec, h, enc, p))
    info = {"users": len(users), "train_users": len(train), "valid_users": len(valid), "test_users": len(test),
            "train_events": int(sum(len(s) for s in train)), "n_items": spec.n_items, **profile(train)}
    if kind == "time":
        info["cutoff_ts"] = cutoff
    return Split(spec, train, valid, test, kind, info)


def profile(train: Sequence[np.ndarray]) -> dict[str, Any]:
    """What the training split holds, for the recipe choice and the metrics that make sense:
    the share of next events that repeat the current item, whether event types and time
    gaps vary (a `user item` file has one type and evenly spaced events)."""
    if not train:
        return {"repeat_rate": 0.0, "has_types": False, "has_gaps": False, "mean_train_length": 0.0}
    pairs = sum(len(s) - 1 for s in train)
    repeats = sum(int((s[1:, 0] == s[:-1, 0]).sum()) for s in train)
    types = np.unique(np.concatenate([s[:, 1] for s in train]))
    gaps = np.unique(np.concatenate([s[1:, 2] for s in train]))
    return {"repeat_rate": repeats / max(pairs, 1), "has_types": len(types) > 1, "has_gaps": len(gaps) > 1,
            "mean_train_length": float(np.mean([len(s) for s in train]))}


# ------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """Time-major padded batch. Inputs at step t predict the event at step t + 1."""

    item: np.ndarray  # (T, B) int64
    etype: np.ndarray  # (T, B) int64
    gap: np.ndarray  # (T, B) int64
    lengths: np.ndarray  # (B,) int64
    next_item: np.ndarray  # (T, B) int64, 0 = no target
    next_type: np.ndarray  # (T, B) int64, 0 = no target
    next_log_gap: np.ndarray  # (T, B) float32, NaN = no target

    @property
    def n_targets(self) -> int:
        return int((self.next_item > 0).sum())


def pad_batch(seqs: Sequence[np.ndarray], max_len: int | None) -> Batch:
    """Training batch from per-user [n, 4] arrays: inputs are events[:-1], targets events[1:],
    each history truncated to its last `max_len` + 1 events."""
    cut = [s[-(max_len + 1):] if max_len else s for s in seqs]
    lengths = np.asarray([len(s) - 1 for s in cut], dtype=np.int64)
    T, B = int(lengths.max()), len(cut)
    item = np.zeros((T, B), np.int64)
    etype = np.zeros((T, B), np.int64)
    gap = np.zeros((T, B), np.int64)
    nitem = np.zeros((T, B), np.int64)
    ntype = np.zeros((T, B), np.int64)
    ngap = np.full((T, B), np.nan, np.float32)
    for b, s in enumerate(cut):
        n = len(s) - 1
        item[:n, b] = s[:-1, 0]
        etype[:n, b] = s[:-1, 1]
        gap[:n, b] = s[:-1, 2]
        nitem[:n, b] = s[1:, 0]
        ntype[:n, b] = s[1:, 1]
        ngap[:n, b] = s[:-1, 3]
    return Batch(item, etype, gap, lengths, nitem, ntype, ngap)


def bucket_batches(
    seqs: Sequence[np.ndarray],
    batch_size: int,
    max_len: int | None,
    rng: np.random.Generator,
    rank: int = 0,
    world: int = 1,
) -> Iterator[Batch]:
    """Users sorted by (truncated) length into batches of similar length, batch order
    shuffled with `rng`. With `world` > 1 each rank takes every world-th batch, and every
    rank gets the same number of batches (DDP steps in lock-step)."""
    lens = np.asarray([min(len(s), (max_len or 10**9) + 1) for s in seqs])
    # Random tie-break inside equal lengths, so batches differ between epochs.
    order = np.lexsort((rng.random(len(seqs)), lens))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    perm = rng.permutation(len(chunks))
    if world > 1:
        keep = (len(perm) // world) * world
        if keep == 0:
            raise ValueError(f"{len(chunks)} batches cannot be shared by {world} processes; lower --batch-size")
        perm = perm[:keep][rank::world]
    for c in perm:
        yield pad_batch([seqs[i] for i in chunks[c]], max_len)


def pad_inputs(cases: Sequence[EvalCase]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Eval inputs (full histories, never truncated) -> item, type, gap (T, B) and lengths (B,)."""
    lengths = np.asarray([len(c.inputs) for c in cases], dtype=np.int64)
    T, B = int(lengths.max()), len(cases)
    arr = np.full((3, T, B), PAD, np.int64)
    for b, c in enumerate(cases):
        arr[:, : len(c.inputs), b] = c.inputs[:, :3].T
    return arr[0], arr[1], arr[2], lengths
