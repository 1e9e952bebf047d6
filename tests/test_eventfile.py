import json

import pyarrow as pa
import pytest

from clickvec.contract.events import ClickEvent
from clickvec.devtools.synth import SynthConfig, generate_events, generate_table
from clickvec.eventfile import (
    EventFileError,
    iter_events,
    read_sequence_file,
    read_table,
    sequences_from_table,
    table_from_sequences,
    write_events,
    write_sequence_file,
)

CFG = SynthConfig(n_users=80, n_items=120, n_categories=6, seed=5, anomaly_fraction=0.05)


@pytest.fixture(scope="module")
def table():
    return generate_table(CFG)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_table_round_trip(table, tmp_path, suffix):
    path = write_events(table, tmp_path / f"ev{suffix}")
    back = read_table(path)
    assert back.schema.names == table.schema.names
    assert back.column("ts").type == pa.int64() and back.column("amount").type == pa.float64()
    assert back.equals(table), suffix


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_events_round_trip(tmp_path, suffix):
    events = generate_events(CFG)
    path = write_events(events, tmp_path / f"ev{suffix}")
    assert list(iter_events(path)) == events
    assert read_table(path).num_rows == len(events)


def test_numeric_looking_ids_stay_strings(tmp_path):
    events = [
        ClickEvent("007", "42", "view", 1_767_225_600_000),
        ClickEvent("7", "0042", "cart", 1_767_225_600_001, "3", 1.5, "9"),
    ]
    for suffix in (".csv", ".jsonl", ".parquet"):
        path = write_events(events, tmp_path / f"n{suffix}")
        assert list(iter_events(path)) == events
        t = read_table(path)
        assert t.column("user_id").to_pylist() == ["007", "7"] and t.column(
            "session_id"
        ).to_pylist() == [None, "9"]


def test_missing_column_named(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("user_id,event_type,ts\nu1,view,1767225600000\n")
    with pytest.raises(EventFileError, match="item_id"):
        read_table(p)
    j = tmp_path / "bad.jsonl"
    j.write_text(json.dumps({"user_id": "u", "item_id": "i", "event_type": "view"}) + "\n")
    with pytest.raises(EventFileError, match="'ts'"):
        read_table(j)


def test_jsonl_bad_line_has_line_number(tmp_path):
    p = tmp_path / "e.jsonl"
    good = ClickEvent("u", "i", "view", 1_767_225_600_000).to_bytes().decode()
    p.write_text(f"{good}\n\n{good}\n{{not json\n{good}\n")
    it = iter_events(p)
    assert next(it).user_id == "u" and next(it).user_id == "u"
    with pytest.raises(EventFileError, match=r"e\.jsonl:4: bad event: not_json"):
        next(it)


def test_unknown_suffix(tmp_path):
    with pytest.raises(EventFileError, match="suffix"):
        write_events([], tmp_path / "x.txt")


def test_sequences_from_table_orders_by_ts_stably():
    t = pa.table(
        {
            "user_id": ["b", "a", "b", "a", "b"],
            "item_id": ["3", "1", "2", "9", "4"],
            "event_type": ["view"] * 5,
            "ts": pa.array([20, 10, 10, 10, 20], pa.int64()),
        }
    )
    assert sequences_from_table(t) == {"b": ["2", "3", "4"], "a": ["1", "9"]}


def test_sequence_file_equals_table_sequences(table, tmp_path):
    p = tmp_path / "seq.txt"
    write_sequence_file(table, p)
    assert read_sequence_file(p) == sequences_from_table(table)
    # The literature's form: integer ids from 1; mapped back, the same sequences.
    q = tmp_path / "seq_int.txt"
    umap, imap = write_sequence_file(table, q, remap=True)
    assert min(umap.values()) == 1 and min(imap.values()) == 1
    inv_u = {str(v): k for k, v in umap.items()}
    inv_i = {str(v): k for k, v in imap.items()}
    back = {inv_u[u]: [inv_i[i] for i in its] for u, its in read_sequence_file(q).items()}
    assert back == sequences_from_table(table)
    # And a sequence file read as a table gives the same sequences again.
    seqs = read_sequence_file(q)
    assert sequences_from_table(table_from_sequences(seqs)) == seqs
