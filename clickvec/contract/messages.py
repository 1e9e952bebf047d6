"""What the worker publishes: `VectorMessage` (topic `user-vectors`) and `DeadLetter`
(the dead-letter topic)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np

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

