"""Synthetic click streams with planted, learnable structure (and labelled anomalies).

What is planted, and who can see it:

- Items belong to categories; inside a category popularity is Zipf. (popularity baseline)
- Every item has a few "next" items (complements, mostly in its own category), taken
  with a moderate probability. (first-order Markov signal, kept moderate on purpose)
- Every user has a persistent interest mixture over 2-3 categories that drifts slowly
  across sessions. Most steps draw the next item's category from that mixture, so the
  next category is predictable from the user's history, not from the last item alone:
  long-term memory an LSTM can use and a first-order Markov model cannot.
- Funnels view -> click -> cart -> purchase -> payment on the same item, amounts on
  purchase and payment; seconds between events in a session, hours to days between
  sessions; heavy-tailed (lognormal) events per user, at least 3.
- Legitimate fast sessions (`burst_fraction` of the normal users, label "normal"):
  one power-browsing session of 15-40 quick events (0.5-3 s apart) of views and clicks,
  occasionally a cart, over popular items of the user's own most-touched categories,
  placed inside one of the user's gaps between sessions. These are the hard negatives
  of fraud alerting: an events-per-minute rule cannot tell them from the bursts below.
- Anomalies (`anomaly_fraction` of users), labelled per event: `account_takeover` (a
  fast burst in categories the user never touched, ending in large purchases and
  payments) and `card_testing` (a fast burst of tiny payments on one item).

Generation walks all users in lock-step with numpy (synthwalk.py); numpy and pyarrow
are imported when a table is generated, not by `clickvec synth --help`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clickvec.contract.events import EVENT_TYPES, ClickEvent

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

LABELS: tuple[str, ...] = ("normal", "account_takeover", "card_testing")


@dataclass(frozen=True)
class SynthConfig:
    n_users: int = 2000
    n_items: int = 1000
    n_categories: int = 20
    seed: int = 0
    anomaly_fraction: float = 0.02
    burst_fraction: float = 0.06  # normal users with one legitimate fast session
    mean_events: float = 30.0
    start_ms: int = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def generate_table(cfg: SynthConfig) -> pa.Table:
    """The synthetic stream as a table, one row per event, sorted by ts then user_id.

    Columns: user_id, item_id, event_type, ts (epoch ms), category, amount (purchase and
    payment only), session_id, label ("normal" | "account_takeover" | "card_testing").
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from clickvec.devtools.synthwalk import (
        cat_ids,
        catalog,
        item_ids,
        normal_events,
        plant_anomalies,
        plant_bursts,
        user_ids,
    )

    rng = np.random.default_rng(cfg.seed)
    cat = catalog(cfg, rng)
    ev = plant_anomalies(cfg, cat, rng, normal_events(cfg, cat, rng))
    # Drawn after everything else, so the rest of the stream is the same for any
    # burst_fraction (only the chosen users gain a session).
    ev = plant_bursts(cfg, cat, rng, ev)
    # Sort by ts, then user (ids are zero-padded, so index order = string order), then
    # each user's own generation order (stable for equal timestamps).
    order = np.lexsort((np.arange(ev["u"].size), ev["u"], ev["ts"]))
    ev = {k: v[order] for k, v in ev.items()}

    def strings(codes: np.ndarray, names: list[str]) -> pa.Array:
        return pa.DictionaryArray.from_arrays(
            pa.array(codes, pa.int32()), pa.array(names, pa.string())
        ).cast(pa.string())

    user_id = strings(ev["u"], user_ids(cfg.n_users))
    session_id = pc.binary_join_element_wise(
        user_id, pc.cast(pa.array(ev["sess"]), pa.string()), "-s"
    )
    amount = pa.array(ev["amount"], pa.float64(), mask=np.isnan(ev["amount"]))
    return pa.table(
        {
            "user_id": user_id,
            "item_id": strings(ev["item"], item_ids(cfg.n_items)),
            "event_type": strings(ev["et"], list(EVENT_TYPES)),
            "ts": pa.array(ev["ts"], pa.int64()),
            "category": strings(cat.item_cat[ev["item"]], cat_ids(cfg.n_categories)),
            "amount": amount,
            "session_id": session_id,
            "label": strings(ev["label"], list(LABELS)),
        }
    )


def generate_events(cfg: SynthConfig) -> list[ClickEvent]:
    """`generate_table` as contract events, same order (the label is not part of an event)."""
    t = generate_table(cfg)
    cols = [
        t.column(n).to_pylist()
        for n in ("user_id", "item_id", "event_type", "ts", "category", "amount", "session_id")
    ]
    return [ClickEvent(*row) for row in zip(*cols, strict=True)]


def anomalies(table: pa.Table) -> dict[str, int]:
    """user_id -> ts of that user's first anomalous (label != "normal") event."""
    import pyarrow.compute as pc

    users = table.column("user_id").to_numpy(zero_copy_only=False)
    ts = table.column("ts").to_numpy()
    bad = pc.not_equal(table.column("label"), "normal").to_numpy(zero_copy_only=False)
    out: dict[str, int] = {}
    for u, t in zip(users[bad], ts[bad], strict=True):
        if u not in out or t < out[u]:
            out[str(u)] = int(t)
    return out


def summary(table: pa.Table) -> dict[str, object]:
    import pyarrow.compute as pc

    labels = table.column("label").value_counts().to_pylist()
    return {
        "users": len(pc.unique(table.column("user_id"))),
        "events": table.num_rows,
        "anomalous_users": len(anomalies(table)),
        "events_by_label": {d["values"]: d["counts"] for d in labels},
        "events_by_type": {
            d["values"]: d["counts"] for d in table.column("event_type").value_counts().to_pylist()
        },
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="clickvec synth", description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=SynthConfig.n_users)
    ap.add_argument("--items", type=int, default=SynthConfig.n_items)
    ap.add_argument("--categories", type=int, default=SynthConfig.n_categories)
    ap.add_argument("--seed", type=int, default=SynthConfig.seed)
    ap.add_argument("--anomaly-fraction", type=float, default=SynthConfig.anomaly_fraction)
    ap.add_argument("--burst-fraction", type=float, default=SynthConfig.burst_fraction,
                    help="normal users with one legitimate fast session (hard negatives)")
    ap.add_argument("--mean-events", type=float, default=SynthConfig.mean_events)
    ap.add_argument(
        "--out", type=Path, default=Path("data/events.parquet"), help=".parquet, .jsonl or .csv"
    )
    ap.add_argument("--jsonl", type=Path, default=None, help="also write this JSONL file")
    args = ap.parse_args(argv)
    from clickvec.eventfile import write_events

    cfg = SynthConfig(
        n_users=args.users,
        n_items=args.items,
        n_categories=args.categories,
        seed=args.seed,
        anomaly_fraction=args.anomaly_fraction,
        burst_fraction=args.burst_fraction,
        mean_events=args.mean_events,
    )
    log.info("synth config: %s", asdict(cfg))
    table = generate_table(cfg)
    write_events(table, args.out)
    if args.jsonl is not None:
        write_events(table, args.jsonl)
    s = summary(table)
    print(
        f"users={s['users']} events={s['events']} anomalous_users={s['anomalous_users']} -> {args.out}"
    )
    print(f"events by type: {s['events_by_type']}")
    print(f"events by label: {s['events_by_label']}")
    return 0
