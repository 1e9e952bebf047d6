"""The click-event contract: one parser, one output message, one set of step-graph names.

Every stage imports this module: the synthetic generator and the producer write events
in this schema, the trainer reads them, the stream parses Kafka bytes with `parse_event`
and publishes `VectorMessage`s. It imports only the standard library, numpy and orjson.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

# --------------------------------------------------------------------------- events

EVENT_TYPES: tuple[str, ...] = ("view", "click", "cart", "purchase", "payment")

MAX_MESSAGE_BYTES = 64 * 1024
MAX_ID_CHARS = 256
# Event time must lie in [2000-01-01, 2100-01-01) epoch milliseconds.
MIN_TS_MS = 946_684_800_000
MAX_TS_MS = 4_102_444_800_000

REQUIRED_FIELDS = ("user_id", "item_id", "event_type", "ts")


class ClickvecError(Exception):
    """Base class of every error clickvec raises on purpose."""


class EventError(ClickvecError):
    """A message that is not a valid click event.

    `reason` is one of `ERROR_REASONS` (stable, used as a metric label and in the
    dead-letter record); `detail` says what exactly was wrong, for a person.
    Action: fix the producer; the event is in the dead-letter topic with its offset.
    """

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in ERROR_REASONS, reason
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

    Valid events are parsed by orjson (about 5x faster than `json`); anything orjson or
    the checks refuse is parsed again by the standard library, whose result and error
    reason are the reference. The two agree on every document orjson accepts, except
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


# ------------------------------------------------------------------ vector message

VECTOR_ENCODINGS = ("json", "f16", "i8")
_BIN_MAGIC = b"CV"
_BIN_VERSION = 1
# magic(2) version(1) dtype(1: 1=f16 2=i8) dim(u16) scale(f32)
_BIN_HEADER = struct.Struct("<2sBBHf")


@dataclass(frozen=True, slots=True)
class VectorMessage:
    """What the stream publishes to `user-vectors` (key = user id) after an event."""

    user_id: str
    model_id: str
    seq: int  # events applied to this user's state, this one included
    event_ts: int  # epoch ms of the event that produced this vector
    emit_ts: int  # epoch ms when the worker produced it
    vector: list[float] = field(default_factory=list)
    surprise: float = 0.0
    source: str = ""  # "topic[partition]@offset" of the event

    def to_bytes(self, encoding: str = "json") -> bytes:
        if encoding == "json":
            return json.dumps(
                {
                    "user_id": self.user_id,
                    "model_id": self.model_id,
                    "seq": self.seq,
                    "event_ts": self.event_ts,
                    "emit_ts": self.emit_ts,
                    "vector": self.vector,
                    "surprise": self.surprise,
                    "source": self.source,
                },
                separators=(",", ":"),
            ).encode()
        meta = json.dumps(
            {
                "user_id": self.user_id,
                "model_id": self.model_id,
                "seq": self.seq,
                "event_ts": self.event_ts,
                "emit_ts": self.emit_ts,
                "surprise": self.surprise,
                "source": self.source,
            },
            separators=(",", ":"),
        ).encode()
        return _BIN_MAGIC + struct.pack("<H", len(meta)) + meta + encode_vector(
            np.asarray(self.vector, dtype=np.float32), encoding
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> VectorMessage:
        if data[:2] == _BIN_MAGIC:
            (n,) = struct.unpack_from("<H", data, 2)
            meta = json.loads(data[4 : 4 + n])
            vec = decode_vector(data[4 + n :]).tolist()
            return cls(vector=vec, **meta)
        d = json.loads(data)
        return cls(**d)


def encode_vector(v: np.ndarray, encoding: str) -> bytes:
    """Compact binary vector: a small header then float16 or symmetric int8 values."""
    v = np.asarray(v, dtype=np.float32).ravel()
    if encoding == "f16":
        return _BIN_HEADER.pack(_BIN_MAGIC, _BIN_VERSION, 1, v.size, 1.0) + v.astype("<f2").tobytes()
    if encoding == "i8":
        m = float(np.max(np.abs(v))) if v.size else 0.0
        scale = m / 127.0 if m > 0 else 1.0
        q = np.clip(np.rint(v / scale), -127, 127).astype(np.int8)
        return _BIN_HEADER.pack(_BIN_MAGIC, _BIN_VERSION, 2, v.size, scale) + q.tobytes()
    raise ValueError(f"unknown vector encoding {encoding!r}; choose one of {VECTOR_ENCODINGS}")


def decode_vector(data: bytes) -> np.ndarray:
    magic, version, dtype, dim, scale = _BIN_HEADER.unpack_from(data, 0)
    if magic != _BIN_MAGIC or version != _BIN_VERSION:
        raise ValueError("not a clickvec binary vector")
    body = data[_BIN_HEADER.size :]
    if dtype == 1:
        return np.frombuffer(body, dtype="<f2", count=dim).astype(np.float32)
    if dtype == 2:
        return np.frombuffer(body, dtype=np.int8, count=dim).astype(np.float32) * np.float32(scale)
    raise ValueError(f"unknown vector dtype code {dtype}")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What the stream publishes to the dead-letter topic for a bad message."""

    reason: str
    detail: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

    def to_bytes(self) -> bytes:
        import base64

        return json.dumps(
            {
                "reason": self.reason,
                "detail": self.detail,
                "topic": self.topic,
                "partition": self.partition,
                "offset": self.offset,
                "key_b64": base64.b64encode(self.key).decode() if self.key is not None else None,
                "value_b64": base64.b64encode(self.value).decode() if self.value is not None else None,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> DeadLetter:
        import base64

        d = json.loads(data)
        return cls(
            reason=d["reason"],
            detail=d["detail"],
            topic=d["topic"],
            partition=d["partition"],
            offset=d["offset"],
            key=base64.b64decode(d["key_b64"]) if d["key_b64"] is not None else None,
            value=base64.b64decode(d["value_b64"]) if d["value_b64"] is not None else None,
        )


# ------------------------------------------------------------ step graph (ONNX) names

# Named once here; export writes them, stream reads them.
# Ragged batch of T steps for B users, time-major.
IN_ITEM = "item"  # int64 [T, B] item index (0 = padding)
IN_ETYPE = "event_type"  # int64 [T, B] event-type index (0 = padding)
IN_GAP = "gap"  # int64 [T, B] time-gap bucket (0 = padding / first event)
IN_LENGTHS = "lengths"  # int32 [B] number of valid steps per user (>= 1)
IN_H = "h_in"  # float32 [L, B, H]
IN_C = "c_in"  # float32 [L, B, H]
OUT_H = "h_out"  # float32 [L, B, H]
OUT_C = "c_out"  # float32 [L, B, H]
OUT_Z_SEQ = "z_seq"  # float32 [T, B, D] vector after each event (padding rows undefined)
OUT_Z_LAST = "z_last"  # float32 [B, D] vector after each user's last event
OUT_SURPRISE = "surprise"  # float32 [T, B] -log p(item_t | z_{t-1}) - log p(event_type_t | z_{t-1})

STEP_INPUTS = (IN_ITEM, IN_ETYPE, IN_GAP, IN_LENGTHS, IN_H, IN_C)
STEP_OUTPUTS = (OUT_H, OUT_C, OUT_Z_SEQ, OUT_Z_LAST, OUT_SURPRISE)

# Topics.
DEFAULT_IN_TOPIC = "clicks"
DEFAULT_OUT_TOPIC = "user-vectors"
DEFAULT_DLQ_TOPIC = "clicks-dlq"
