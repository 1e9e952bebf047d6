"""The backfill's compute path without a broker: the bulk parser is `parse_event` on
every value, and the lockstep rebuild (users of every length, in two rounds) gives the
offline encoder's vectors and the single-round rebuild's states."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from test_contract import BAD_EXAMPLES, _event_like, _json_values, _near_valid

from clickvec.bundle.reader import load_bundle
from clickvec.contract.events import EventError, parse_core_many, parse_event
from clickvec.lifecycle.encode import Prior, RecurrentSession, rebuild
from clickvec.lifecycle.history import Columns

VALID = {"user_id": "u1", "item_id": "i1", "event_type": "click", "ts": 1_767_225_600_000}
EDGE = [
    *(data for _, data in BAD_EXAMPLES),
    json.dumps(VALID).encode(),
    *(json.dumps({**VALID, k: v}).encode() for k, v in [
        ("user_id", 42), ("user_id", " "), ("user_id", "\u00a0\u2003"), ("item_id", " x "), ("item_id", "x" * 256),
        ("item_id", "x" * 257), ("event_type", "\t"), ("ts", 1.767e12), ("ts", True), ("ts", 2**70),
        ("amount", 3), ("amount", None), ("category", "c"), ("category", 5), ("session_id", ""), ("extra", [1])]),
]


def _reference(values: list[bytes | None]) -> list[tuple[str, str, str, int] | None]:
    out: list[tuple[str, str, str, int] | None] = []
    for v in values:
        try:
            ev = parse_event(v)
        except EventError:
            out.append(None)
        else:
            out.append((ev.user_id, ev.item_id, ev.event_type, ev.ts))
    return out


def test_bulk_parse_edge_cases() -> None:
    assert parse_core_many([*EDGE, None]) == _reference([*EDGE, None])


@settings(max_examples=200, deadline=None)
@given(st.lists((_json_values | _event_like | _near_valid).map(lambda o: json.dumps(o).encode())
                | st.binary(max_size=128), max_size=8))
def test_bulk_parse_is_parse_event(values: list[bytes]) -> None:
    values = [*values, json.dumps(VALID).encode()]
    assert parse_core_many(values) == _reference(values)


def test_lockstep_rebuild_matches_offline(stream_bundle_path) -> None:
    bundle = load_bundle(stream_bundle_path, providers="cpu", intra_op_threads=1)
    rng = np.random.default_rng(3)
    spec, n_users = bundle.spec, 60
    lengths = rng.integers(1, 40, n_users)
    lengths[:5] = [1, 1, 2, 39, 2]
    seqs = {f"u{u}": [(spec.items[int(rng.integers(len(spec.items)))], str(rng.choice(spec.event_types)),
                       1_767_225_600_000 + int(t) * 997 * (u + 1)) for t in range(n)]
            for u, n in enumerate(lengths.tolist())}
    # read order interleaves users, as a topic does
    rows = sorted((t, uid) for uid, evs in seqs.items() for t in range(len(evs)))

    def columns(ts_range: range) -> Columns:
        cols = Columns(spec)
        picked = [(t, uid) for t, uid in rows if t in ts_range]
        values = [json.dumps(dict(zip(("user_id", "item_id", "event_type", "ts"), (uid, *seqs[uid][t]),
                                      strict=True))).encode() for t, uid in picked]
        keys = [uid.encode() for _, uid in picked] + [b"u1", b"nobody"]  # not an event; not its user
        cols.add_messages(keys, [*values, b"{}", values[0]], [0] * len(keys), list(range(len(keys))))
        assert cols.skipped == 2
        return cols

    session = RecurrentSession(bundle, 1)
    whole = rebuild(session, columns(range(0, 40)).history("t"), batch_users=7)
    first = columns(range(0, 3)).history("t")
    built = rebuild(session, first, batch_users=7)
    second = columns(range(3, 40)).history("t")
    at = [first.users.index(u) for u in second.users]
    again = rebuild(session, second, Prior(built.h[at], built.c[at], built.seq[at], built.last_ts[at]), batch_users=5)
    hist = columns(range(0, 40)).history("t")
    for u, uid in enumerate(hist.users):
        evs = seqs[uid]
        z = bundle.encode_offline(spec.encode_sequence(*zip(*evs, strict=True)))
        assert np.abs(whole.z[u] - z[-1]).max() <= 1e-5 and whole.seq[u] == len(evs) and whole.last_ts[u] == evs[-1][2]
        if uid in second.users:
            k = second.users.index(uid)
            assert np.abs(again.z[k] - z[-1]).max() <= 1e-5 and again.seq[k] == len(evs)
            assert np.abs(again.h[k] - whole.h[u]).max() <= 1e-5
