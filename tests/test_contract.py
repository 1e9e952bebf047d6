"""The event contract: every error reason reachable, no other exception ever escapes
`parse_event`, valid events round-trip, vector messages round-trip in each encoding."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clickvec.contract.events import (
    ERROR_REASONS,
    MAX_ID_CHARS,
    MAX_MESSAGE_BYTES,
    MAX_TS_MS,
    MIN_TS_MS,
    ClickEvent,
    EventError,
    parse_event,
    parse_event_reference,
)
from clickvec.contract.messages import DeadLetter, VectorMessage, decode_vector, encode_vector

TS = 1_700_000_000_000
VALID = {"user_id": "u1", "item_id": "i1", "event_type": "click", "ts": TS}


def _j(**over: object) -> bytes:
    d = {**VALID, **over}
    return json.dumps({k: v for k, v in d.items() if v is not _DROP}).encode()


_DROP = object()

# (reason, message bytes): at least one example per reason, several for the subtle ones.
BAD_EXAMPLES: list[tuple[str, bytes | None]] = [
    ("empty_message", b""),
    ("empty_message", None),
    ("oversized_message", _j(item_id="x" * 10)[:-1] + b" " * MAX_MESSAGE_BYTES + b"}"),
    ("bad_encoding", b'{"user_id": "\xff"}'),
    ("bad_encoding", b"\xc3\x28"),
    # Valid JSON, but the escape decodes to a lone surrogate: no UTF-8 Kafka key possible.
    ("bad_encoding", _j(user_id=_DROP)[:-1] + b', "user_id": "u\\ud800"}'),
    ("bad_encoding", _j(event_type=_DROP)[:-1] + b', "event_type": "\\udfff"}'),
    ("not_json", b"{"),
    ("not_json", b"user_id=u1"),
    ("not_json", b"[" * 10_000 + b"]" * 10_000),
    ("not_an_object", b"[1, 2]"),
    ("not_an_object", b'"a string"'),
    ("not_an_object", b"null"),
    ("missing_field", _j(user_id=_DROP)),
    ("missing_field", _j(item_id=None)),
    ("missing_field", _j(event_type=_DROP)),
    ("missing_field", _j(ts=_DROP)),
    ("wrong_type", _j(user_id=["u"])),
    ("wrong_type", _j(item_id=True)),
    ("wrong_type", _j(event_type=3)),
    ("wrong_type", _j(ts="1700000000000")),
    ("wrong_type", _j(ts=True)),
    ("wrong_type", _j(ts=TS + 0.5)),
    ("wrong_type", _j(amount="12.5")),
    ("wrong_type", _j(category={"a": 1})),
    ("empty_id", _j(user_id="")),
    ("empty_id", _j(item_id="   ")),
    ("empty_id", _j(event_type="\t")),
    ("oversized_id", _j(user_id="u" * (MAX_ID_CHARS + 1))),
    ("oversized_id", _j(event_type="e" * (MAX_ID_CHARS + 1))),
    ("oversized_id", _j(session_id="s" * (MAX_ID_CHARS + 1))),
    ("non_finite_number", _j(ts=_DROP)[:-1] + b', "ts": NaN}'),
    ("non_finite_number", _j(amount=_DROP)[:-1] + b', "amount": Infinity}'),
    ("non_finite_number", _j(amount=_DROP)[:-1] + b', "amount": 1e400}'),
    ("non_finite_number", _j(ts=_DROP)[:-1] + b', "ts": -1e400}'),
    ("ts_out_of_range", _j(ts=0)),
    ("ts_out_of_range", _j(ts=MIN_TS_MS - 1)),
    ("ts_out_of_range", _j(ts=MAX_TS_MS)),
    ("ts_out_of_range", _j(ts=1_700_000_000)),  # seconds, not milliseconds
    ("negative_amount", _j(amount=-0.01)),
    ("negative_amount", _j(amount=-5)),
]


@pytest.mark.parametrize(
    "reason, data", BAD_EXAMPLES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BAD_EXAMPLES)]
)
def test_bad_event_reason(reason: str, data: bytes | None) -> None:
    with pytest.raises(EventError) as ei:
        parse_event(data)
    assert ei.value.reason == reason, ei.value.detail


def test_every_reason_has_an_example() -> None:
    assert {r for r, _ in BAD_EXAMPLES} == set(ERROR_REASONS)


def test_valid_event_forms() -> None:
    e = parse_event(_j(user_id=42, item_id=7, amount=3, category="c", session_id="s"))
    assert e == ClickEvent("42", "7", "click", TS, "c", 3.0, "s")
    assert parse_event(_j(ts=float(TS))).ts == TS
    assert parse_event(_j(event_type="never-seen-before")).event_type == "never-seen-before"
    assert parse_event(_j(amount=0, extra={"ignored": [1, 2]})).amount == 0.0
    assert parse_event(memoryview(_j())) == parse_event(bytearray(_j()))
    assert parse_event(_j(user_id="u" * MAX_ID_CHARS)).user_id == "u" * MAX_ID_CHARS
    assert parse_event(_j(ts=MIN_TS_MS)).ts == MIN_TS_MS


def _must_be_event_or_error(data: bytes) -> None:
    try:
        ev = parse_event(data)
    except EventError as e:
        assert e.reason in ERROR_REASONS
        return
    assert isinstance(ev, ClickEvent)
    assert ev.user_id.strip() and ev.item_id.strip() and ev.event_type.strip()
    ev.user_id.encode()  # usable as a Kafka key
    assert parse_event(ev.to_bytes()) == ev
    assert MIN_TS_MS <= ev.ts < MAX_TS_MS and isinstance(ev.ts, int)
    assert ev.amount is None or (math.isfinite(ev.amount) and ev.amount >= 0)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=512))
def test_parse_arbitrary_bytes_raises_only_event_error(data: bytes) -> None:
    _must_be_event_or_error(data)


# Lone surrogates included: JSON can carry them as \\uXXXX escapes.
_text = st.text(st.characters() | st.sampled_from(["\ud800", "\udc00", "\udfff"]), max_size=20)
_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | _text
)
_FIELDS = ("user_id", "item_id", "event_type", "ts", "category", "amount", "session_id")
_json_values = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Objects that mostly carry the contract's own keys, so the checks after JSON parsing run.
_event_like = st.dictionaries(
    st.sampled_from(_FIELDS) | st.text(max_size=8), _json_values, max_size=9
)
_near_valid = st.fixed_dictionaries(
    {
        "user_id": st.just("u1") | _json_values,
        "item_id": st.just("i1") | _json_values,
        "event_type": st.just("click") | _json_values,
        "ts": st.integers(MIN_TS_MS - 10, MAX_TS_MS + 10) | st.floats() | _json_values,
    },
    optional={
        "amount": st.floats() | st.integers() | _json_values,
        "category": st.text(max_size=300) | _json_values,
        "session_id": st.text(max_size=3) | _json_values,
    },
)


@settings(max_examples=1000, deadline=None)
@given(_json_values | _event_like | _near_valid)
def test_parse_arbitrary_json_raises_only_event_error(obj: object) -> None:
    _must_be_event_or_error(json.dumps(obj).encode())


def _outcome(parse: object, data: bytes) -> object:
    try:
        return parse(data)  # type: ignore[operator]
    except EventError as e:
        return ("error", e.reason)


@settings(max_examples=1000, deadline=None)
@given((_json_values | _event_like | _near_valid).map(lambda o: json.dumps(o).encode()) | st.binary(max_size=256))
def test_fast_parse_agrees_with_reference(data: bytes) -> None:
    """orjson's fast path returns what the standard library's path returns, or the same
    error reason, for any document (huge integers, NaN, lone surrogates included)."""
    assert _outcome(parse_event, data) == _outcome(parse_event_reference, data)


@pytest.mark.parametrize("doc", [
    b'{"user_id":"u","item_id":123456789012345678901234567890,"event_type":"click","ts":1700000000000}',
    b'{"user_id":"u","item_id":"i","event_type":"click","ts":1700000000000,"amount":123456789012345678901234567890}',
    b'{"user_id":"u","item_id":"i","event_type":"click","ts":1700000000000,"amount":18446744073709551615}',
    b'{"user_id":"u","item_id":"i","event_type":"click","ts":1.7e12,"amount":NaN}',
    b'{"user_id":"\\ud800","item_id":"i","event_type":"click","ts":1700000000000}',
    b'\xef\xbb\xbf{"user_id":"u","item_id":"i","event_type":"click","ts":1700000000000}',
])
def test_fast_parse_edge_documents(doc: bytes) -> None:
    assert _outcome(parse_event, doc) == _outcome(parse_event_reference, doc)


_ids = st.text(min_size=1, max_size=MAX_ID_CHARS).filter(lambda s: s.strip() != "")
_valid_events = st.builds(
    ClickEvent,
    user_id=_ids,
    item_id=_ids,
    event_type=_ids,
    ts=st.integers(MIN_TS_MS, MAX_TS_MS - 1),
    category=st.none() | _ids,
    amount=st.none()
    | st.floats(min_value=0, allow_nan=False, allow_infinity=False)
    | st.integers(0, 2**53),
    session_id=st.none() | _ids,
)


@settings(max_examples=1000, deadline=None)
@given(_valid_events)
def test_valid_event_round_trip(ev: ClickEvent) -> None:
    back = parse_event(ev.to_bytes())
    assert back == ev
    assert back.to_bytes() == parse_event(back.to_bytes()).to_bytes()


# ----------------------------------------------------------------- vector messages

_vectors = st.lists(st.floats(-100, 100, width=32), max_size=64)
_messages = st.builds(
    VectorMessage,
    user_id=st.text(max_size=40),
    model_id=st.text(max_size=40),
    seq=st.integers(0, 2**40),
    event_ts=st.integers(MIN_TS_MS, MAX_TS_MS),
    emit_ts=st.integers(MIN_TS_MS, MAX_TS_MS),
    vector=_vectors,
    surprise=st.floats(0, 1e6),
    source=st.text(max_size=40),
)


@settings(max_examples=300, deadline=None)
@given(_messages)
def test_vector_message_json_round_trip(m: VectorMessage) -> None:
    assert VectorMessage.from_bytes(m.to_bytes("json")) == m
    assert VectorMessage.from_bytes(m.to_bytes()) == m


@settings(max_examples=300, deadline=None)
@given(_messages, st.sampled_from(["f16", "i8"]))
def test_vector_message_binary_round_trip(m: VectorMessage, enc: str) -> None:
    data = m.to_bytes(enc)
    back = VectorMessage.from_bytes(data)
    v = np.asarray(m.vector, dtype=np.float32)
    got = np.asarray(back.vector, dtype=np.float32)
    assert back.user_id == m.user_id and back.model_id == m.model_id and back.seq == m.seq
    assert (back.event_ts, back.emit_ts, back.surprise, back.source) == (
        m.event_ts,
        m.emit_ts,
        m.surprise,
        m.source,
    )
    assert got.shape == v.shape
    if v.size == 0:
        return
    if enc == "f16":
        np.testing.assert_allclose(got, v, rtol=2**-10, atol=1e-7)
        assert len(data) < len(m.to_bytes("json")) or v.size < 4
    else:
        step = float(np.max(np.abs(v))) / 127.0
        assert np.max(np.abs(got - v)) <= step / 2 + 1e-6


def test_vector_encodings_exact_cases() -> None:
    v = np.array([0.5, -1.0, 0.25, 0.0], dtype=np.float32)
    np.testing.assert_array_equal(decode_vector(encode_vector(v, "f16")), v)
    q = decode_vector(encode_vector(v, "i8"))
    assert q[1] == -1.0 and q[3] == 0.0
    np.testing.assert_array_equal(decode_vector(encode_vector(np.zeros(8), "i8")), np.zeros(8))
    with pytest.raises(ValueError):
        encode_vector(v, "f64")


def test_dead_letter_round_trip() -> None:
    for key, value in ((b"u1", b"\xff\x00"), (None, None), (b"", b"")):
        d = DeadLetter("not_json", "Expecting value", "clicks", 3, 12345, key, value)
        assert DeadLetter.from_bytes(d.to_bytes()) == d
