"""Click events: the one parser from Kafka bytes to a validated `ClickEvent` or a precise
error reason (`EventError.reason`, one of `ERROR_REASONS`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import orjson

from clickvec.errors import ClickvecError

EVENT_TYPES: tuple[str, ...] = ("view", "click", "cart", "purchase", "payment")

MAX_MESSAGE_BYTES = 64 * 1024
MAX_ID_CHARS = 256
# Event time must lie in [2000-01-01, 2100-01-01) epoch milliseconds.
MIN_TS_MS = 946_684_800_000
MAX_TS_MS = 4_102_444_800_000

REQUIRED_FIELDS = ("user_id", "item_id", "event_type", "ts")


class EventError(ClickvecError):
    """A message that is not a valid click event.

    `reason` is one of `ERROR_REASONS` (stable, used as a metric label and in the
    dead-letter record); `detail` says what exactly was wrong, for a person.
    Action: fix the producer; the event is in the dead-letter topic with its offset.
    """

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in ERROR_REASONS or reason in WIRE_ERROR_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


ERROR_REASONS: tuple[str, ...] = (
    "empty_message",
    "oversized_message",
    "bad_encoding",
    "not_json",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "empty_id",
    "oversized_id",
    "non_finite_number",
    "ts_out_of_range",
    "negative_amount",
)

# Reasons of the Schema-Registry formats and of the message key (clickvec.contract.wire,
# the worker's engine), beside the reasons above that every format shares once a message
# is decoded into fields.
WIRE_ERROR_REASONS: tuple[str, ...] = (
    "bad_framing",  # not Confluent wire framing (magic byte 0 + 4-byte schema id + payload)
    "unknown_schema",  # the framing's schema id is not in the registry
    "undecodable",  # the payload does not decode with its registered schema
    "schema_violation",  # a JSON Schema payload that its registered schema refuses
    "bad_key",  # --key registry: the key does not decode, or holds no user id
    "key_mismatch",  # the key's user id is not the event's user_id
)


@dataclass(frozen=True, slots=True)
class ClickEvent:
    """One validated user-behaviour event. `event_type` may be any string: types the
    model does not know map to an out-of-vocabulary bucket in `clickvec.features`."""

    user_id: str
    item_id: str
    event_type: str
    ts: int  # epoch milliseconds
    category: str | None = None
    amount: float | None = None
    session_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "user_id": self.user_id,
            "item_id": self.item_id,
            "event_type": self.event_type,
            "ts": self.ts,
        }
        if self.category is not None:
            d["category"] = self.category
        if self.amount is not None:
            d["amount"] = self.amount
        if self.session_id is not None:
            d["session_id"] = self.session_id
        return d

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()


def _id_field(obj: dict[str, Any], name: str, required: bool) -> str | None:
    if name not in obj or obj[name] is None:
        if required:
            raise EventError("missing_field", f"field {name!r} is required")
        return None
    v = obj[name]
    # Integer ids are common in upstream systems; accept them as their decimal string.
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise EventError("wrong_type", f"field {name!r} must be a string, got {type(v).__name__}")
    s = str(v)
    if not s.strip():
        raise EventError("empty_id", f"field {name!r} is empty")
    if len(s) > MAX_ID_CHARS:
        raise EventError("oversized_id", f"field {name!r} has {len(s)} characters > {MAX_ID_CHARS}")
    _check_encodable(name, s)
    return s


def _check_encodable(name: str, s: str) -> None:
    # A JSON escape like "\ud800" decodes to a lone surrogate, which cannot be encoded
    # back to UTF-8: such an id would crash every consumer that uses it as a Kafka key.
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise EventError("bad_encoding", f"field {name!r} holds a lone surrogate (\\uD800-\\uDFFF escape)") from None


def _reject_constant(token: str) -> float:
    raise EventError("non_finite_number", f"JSON constant {token} is not allowed")


def parse_event(data: bytes | bytearray | memoryview | None) -> ClickEvent:
    """Turn raw message bytes into a `ClickEvent`, or raise `EventError` with a reason.

    Never raises anything else, whatever the bytes.

    Valid events are parsed by orjson, the faster parser, because the worker parses every
    event it reads; anything orjson or the checks refuse is parsed again by the standard
    library, whose result and error reason are the reference. The two agree on every document orjson accepts, except
    integer literals beyond 64 bits, which orjson turns into floats: an event holding one
    takes the reference path too.
    """
    _check_size(data)
    try:
        obj = orjson.loads(data)  # type: ignore[arg-type]
    except orjson.JSONDecodeError:
        obj = None
    if type(obj) is dict:
        try:
            ev = _event_of(obj)
        except EventError:
            pass
        else:
            if ev.amount is None or ev.amount < _BIG_AMOUNT:
                return ev
    return _event_of(_loads_reference(data))  # type: ignore[arg-type]


def parse_event_reference(data: bytes | bytearray | memoryview | None) -> ClickEvent:
    """`parse_event` through the standard library's `json` alone: the reference the
    fast path is tested against."""
    _check_size(data)
    return _event_of(_loads_reference(data))  # type: ignore[arg-type]


def _check_size(data: bytes | bytearray | memoryview | None) -> None:
    if data is None or len(data) == 0:
        raise EventError("empty_message", "message value is empty")
    if len(data) > MAX_MESSAGE_BYTES:
        raise EventError("oversized_message", f"{len(data)} bytes > {MAX_MESSAGE_BYTES}")


_BIG_AMOUNT = float(2**63)  # the reference path turns integer amounts from here on into inf


def _loads_reference(data: bytes | bytearray | memoryview) -> Any:
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise EventError("bad_encoding", f"not UTF-8: {e.reason} at byte {e.start}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except EventError:
        raise
    except (ValueError, RecursionError) as e:
        raise EventError("not_json", str(e)[:200]) from None


def event_of(obj: Any) -> ClickEvent:
    """A `ClickEvent` from already decoded fields (a dict from JSON, Avro, JSON Schema or
    Protobuf), checked as `parse_event` checks JSON; fields it does not know are ignored."""
    return _event_of(obj)


def _event_of(obj: Any) -> ClickEvent:
    if not isinstance(obj, dict):
        raise EventError("not_an_object", f"top-level JSON is {type(obj).__name__}, not an object")

    user_id = _id_field(obj, "user_id", True)
    item_id = _id_field(obj, "item_id", True)
    if "event_type" not in obj or obj["event_type"] is None:
        raise EventError("missing_field", "field 'event_type' is required")
    et = obj["event_type"]
    if not isinstance(et, str):
        raise EventError("wrong_type", f"field 'event_type' must be a string, got {type(et).__name__}")
    if not et.strip():
        raise EventError("empty_id", "field 'event_type' is empty")
    if len(et) > MAX_ID_CHARS:
        raise EventError("oversized_id", "field 'event_type' is too long")
    _check_encodable("event_type", et)

    if "ts" not in obj or obj["ts"] is None:
        raise EventError("missing_field", "field 'ts' is required")
    ts_raw = obj["ts"]
    if isinstance(ts_raw, bool) or not isinstance(ts_raw, (int, float)):
        raise EventError("wrong_type", f"field 'ts' must be a number (epoch ms), got {type(ts_raw).__name__}")
    if isinstance(ts_raw, float):
        if not math.isfinite(ts_raw):
            raise EventError("non_finite_number", "field 'ts' is not finite")
        if not ts_raw.is_integer():
            raise EventError("wrong_type", "field 'ts' must be whole milliseconds")
    ts = int(ts_raw)
    if not MIN_TS_MS <= ts < MAX_TS_MS:
        raise EventError("ts_out_of_range", f"ts={ts} is outside [{MIN_TS_MS}, {MAX_TS_MS}) epoch ms")

    category = _id_field(obj, "category", False)
    session_id = _id_field(obj, "session_id", False)
    amount: float | None = None
    if obj.get("amount") is not None:
        a = obj["amount"]
        if isinstance(a, bool) or not isinstance(a, (int, float)):
            raise EventError("wrong_type", f"field 'amount' must be a number, got {type(a).__name__}")
        amount = float(a) if not isinstance(a, int) or abs(a) < 2**63 else math.inf
        if not math.isfinite(amount):
            raise EventError("non_finite_number", "field 'amount' is not finite")
        if amount < 0:
            raise EventError("negative_amount", f"amount={amount} is negative")
    assert user_id is not None and item_id is not None
    return ClickEvent(user_id, item_id, et, ts, category, amount, session_id)



def parse_core_many(values: list[bytes | None]) -> list[tuple[str, str, str, int] | None]:
    """(user_id, item_id, event_type, ts) of each message value, None for a value that
    `parse_event` refuses: `parse_event`'s result on every value, for bulk readers (the
    backfill) that need only these four fields.

    The common event (orjson decodes it to an object whose three ids are strings and ts an
    integer, no optional field set) is checked here with a few type and bound tests; every
    other value goes through `parse_event` itself. orjson never yields a lone surrogate,
    so the encodability check holds for its strings; `s and not s.isspace()` is
    `bool(s.strip())`.
    """
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    out: list[tuple[str, str, str, int] | None] = []
    add = out.append
    for v in values:
        try:
            obj = loads(v) if v and len(v) <= MAX_MESSAGE_BYTES else None  # type: ignore[arg-type]
        except decode_error:
            obj = None
        if type(obj) is dict:
            g = obj.get
            u, i, e, ts = g("user_id"), g("item_id"), g("event_type"), g("ts")
            if (type(u) is str and type(i) is str and type(e) is str and type(ts) is int
                    and MIN_TS_MS <= ts < MAX_TS_MS
                    and 0 < len(u) <= MAX_ID_CHARS and 0 < len(i) <= MAX_ID_CHARS and 0 < len(e) <= MAX_ID_CHARS
                    and not u.isspace() and not i.isspace() and not e.isspace()
                    and g("category") is None and g("session_id") is None and g("amount") is None):
                add((u, i, e, ts))
                continue
        try:
            ev = parse_event(v)
        except EventError:
            add(None)
        else:
            add((ev.user_id, ev.item_id, ev.event_type, ev.ts))
    return out
