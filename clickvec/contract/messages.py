"""What the worker publishes: `VectorMessage` (topic `user-vectors`) and `DeadLetter`
(the dead-letter topic)."""

from __future__ import annotations

import json
import json.encoder
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson

# ------------------------------------------------------------------ vector message

VECTOR_ENCODINGS = ("json", "f16", "i8")
# The worker's output formats: the encodings above, and Avro through a Schema Registry.
OUT_FORMATS = (*VECTOR_ENCODINGS, "avro")
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
            # A float32 array (the model's output, as the worker holds it) is written in
            # float32's shortest form, any other vector as float64 values.
            v = self.vector
            dtype = np.float32 if isinstance(v, np.ndarray) and v.dtype == np.float32 else np.float64
            return vector_json(vector_json_head(self.user_id, self.model_id), self.seq, self.event_ts,
                               self.emit_ts, np.ascontiguousarray(v, dtype=dtype), float(self.surprise),
                               json.dumps(self.source))
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
        """Read any encoding the worker writes (json, f16, i8; Avro in Confluent framing,
        read with this contract's schema). Fields this version does not know are ignored
        (the contract's evolution rules, clickvec/contract/__init__.py)."""
        return cls(**vector_fields(data))


def vector_fields(data: bytes) -> dict[str, object]:
    """The fields of a vector message in any encoding, those this contract version knows
    (`VectorMessage`'s), whichever of them the message has."""
    if data[:2] == _BIN_MAGIC:
        (n,) = struct.unpack_from("<H", data, 2)
        meta = _known(json.loads(data[4 : 4 + n]), _META_FIELDS)
        meta["vector"] = decode_vector(data[4 + n :]).tolist()
        return meta
    if data[:1] == _FRAME_MAGIC:
        from clickvec.contract.avro import read_vector_frame

        return _known(read_vector_frame(data), _VECTOR_FIELDS)
    return _known(json.loads(data), _VECTOR_FIELDS)


_VECTOR_FIELDS = ("user_id", "model_id", "seq", "event_ts", "emit_ts", "vector", "surprise", "source")
_META_FIELDS = tuple(f for f in _VECTOR_FIELDS if f != "vector")
_FRAME_MAGIC = b"\x00"  # Confluent wire framing: magic byte 0, schema id, Avro payload


def _known(d: object, names: tuple[str, ...]) -> dict[str, object]:
    """The fields of `d` this contract version knows; a reader ignores any other."""
    if not isinstance(d, dict):
        raise ValueError(f"a message must be an object, got {type(d).__name__}")
    return {k: d[k] for k in names if k in d}


# ------------------------------------------------------------------ binary vector body


# The JSON vector message has this one writer; the worker calls its parts directly on
# its hot path. It is built without json.dumps, whose float repr is the costly part: the
# vector goes through orjson, which writes each value's shortest form in the array's own
# precision (float32 rows from the model read back to the same float32; float64 values,
# as `VectorMessage.to_bytes` passes them, to the same float64). Field order and the
# other values are those json.dumps would write.
_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_TOPIC_JSON: dict[str, str] = {}
_json_str = json.encoder.encode_basestring_ascii  # json.dumps(s) for a str s, ensure_ascii as by default


def vector_json_head(user_id: str, model_id: str) -> str:
    """The message's first fields, shared by every vector of one user in a batch."""
    # json.dumps of a string, less its Python-level wrapper (its own C escaper).
    return f'{{"user_id":{_json_str(user_id)},"model_id":{_json_str(model_id)},'


def vector_json_source(topic: str, partition: int, offset: int) -> str:
    """`"topic[partition]@offset"` as a JSON string."""
    return f'{topic_json(topic)}[{partition}]@{offset}"'


def vector_json(head: str, seq: int, event_ts: int, emit_ts: int, vector: np.ndarray, surprise: float,
                source_json: str) -> bytes:
    """The JSON vector message from `vector_json_head`, the values, and the source as
    a JSON string (`vector_json_source`). `vector` is a C-contiguous 1-d array."""
    return vector_json_many(head, seq, [event_ts], emit_ts, vector_json_rows(vector[None, :]), [surprise],
                            [source_json])[0]


def vector_json_rows(vectors: np.ndarray) -> list[str]:
    """The JSON values of each row of a C-contiguous 2-d array, without their brackets,
    from one orjson call: `[[a,b],[c,d]]` splits at `],[` (a number holds no bracket)."""
    text = orjson.dumps(vectors, option=_NUMPY).decode()
    return text[2:-2].split("],[")


def vector_json_many(head: str, seq0: int, event_ts: Sequence[int], emit_ts: int, rows: Sequence[str],
                     surprises: Sequence[float], sources_json: Sequence[str]) -> list[bytes]:
    """The JSON vector messages of one user's consecutive vectors (seq0, seq0 + 1, ...):
    the message's one writer. `rows` from `vector_json_rows`."""
    out = []
    isfinite, dumps = math.isfinite, json.dumps
    for k, ts in enumerate(event_ts):
        su = surprises[k]
        s = repr(su) if isfinite(su) else dumps(su)  # json.dumps' float form
        out.append(f'{head}"seq":{seq0 + k},"event_ts":{ts},"emit_ts":{emit_ts},"vector":[{rows[k]}],'
                   f'"surprise":{s},"source":{sources_json[k]}}}'.encode())
    return out


def vector_json_batch(heads: Sequence[str], seqs: Sequence[int], event_ts: Sequence[int], emit_ts: int,
                      rows: Sequence[str], surprises: Sequence[float], sources_json: Sequence[str]) -> list[bytes]:
    """`vector_json_many` for the vectors of many users at once, one entry per vector
    in every argument but `emit_ts` (the worker's whole ORT call in one comprehension,
    without a call per user). Same bytes as `vector_json_many`, tested."""
    sur = list(map(repr, surprises))
    if not all(map(math.isfinite, surprises)):  # json.dumps' form of nan and the infinities
        sur = [s if math.isfinite(x) else json.dumps(x) for s, x in zip(sur, surprises, strict=True)]
    return [f'{h}"seq":{q},"event_ts":{t},"emit_ts":{emit_ts},"vector":[{r}],"surprise":{s},"source":{src}}}'.encode()
            for h, q, t, r, s, src in zip(heads, seqs, event_ts, rows, sur, sources_json, strict=True)]


def topic_json(topic: str) -> str:
    """The start of `vector_json_source`'s string: the topic as JSON without its closing quote."""
    t = _TOPIC_JSON.get(topic)
    if t is None:
        t = _TOPIC_JSON[topic] = json.dumps(topic)[:-1]
    return t


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


# A dead letter is at most this many bytes: the producer refuses messages over its
# message.max.bytes (1,000,000 by default), and base64 makes a value 4/3 as long, so an
# input of ~750 KB or more would otherwise give a dead letter no producer can send, and
# the worker would stop on it at every start. The message key is capped too (it travels
# beside the value).
DEAD_LETTER_MAX_BYTES = 900_000
DEAD_LETTER_MAX_KEY_BYTES = 16_384
_DETAIL_MAX_CHARS = 4_096
# What a dead letter keeps of the bad message (`--dlq-payload`): its bytes ("full"), only
# their sha256 and size ("hash"), or only their size ("none"). A key or value may hold
# personal data (the key is usually the user id) that the dead-letter topic, read by
# operators, should not keep.
DLQ_PAYLOAD_POLICIES = ("full", "hash", "none")
# Details that may quote the message (its key, ids, a decoder's view of the bytes): with
# a policy other than "full" they are replaced by these texts.
_QUOTING_DETAILS = {
    "key_mismatch": "the message key's user id is not the event's user_id; key the source topic by user_id",
    "bad_key": "the message key does not decode to a user id",
    "undecodable": "the payload does not decode with its registered schema",
    "schema_violation": "the payload does not validate against its registered JSON Schema",
}


def dead_letter_key(key: bytes | None, payload: str = "full") -> bytes | None:
    """The Kafka key of a dead letter: the message's key capped in size ("full"), its
    sha256 ("hash": letters of one key still share a partition), or none ("none")."""
    if key is None or payload == "none":
        return None
    if payload == "hash":
        return _digest(key).encode()  # type: ignore[union-attr]
    return key[:DEAD_LETTER_MAX_KEY_BYTES]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What the stream publishes to the dead-letter topic for a bad message.

    A dead letter whose JSON would exceed `DEAD_LETTER_MAX_BYTES` keeps only a prefix of
    the key and value: `truncated` is then true, and `key_size` / `value_size` and
    `key_sha256` / `value_sha256` describe the original bytes (None when not truncated).

    Dead letters are at-least-once: after a crash, the batch's messages are processed
    again and their dead letters published again. Deduplicate on (topic, partition,
    offset).

    `payload` is the policy it was written with (`DLQ_PAYLOAD_POLICIES`; build one with
    `DeadLetter.of`): with "hash" or "none", `key` and `value` are None and the sizes
    (and with "hash" the sha256 hashes) describe the original bytes."""

    reason: str
    detail: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    truncated: bool = False
    key_size: int | None = None
    value_size: int | None = None
    key_sha256: str | None = None
    value_sha256: str | None = None
    payload: str = "full"

    @classmethod
    def of(cls, reason: str, detail: str, topic: str, partition: int, offset: int, key: bytes | None,
           value: bytes | None, payload: str = "full") -> DeadLetter:
        """The dead letter of a message, keeping of its key and value what `payload` says."""
        if payload == "full":
            return cls(reason, detail, topic, partition, offset, key, value)
        if payload not in DLQ_PAYLOAD_POLICIES:
            raise ValueError(f"dead-letter payload policy must be one of {DLQ_PAYLOAD_POLICIES}, got {payload!r}")
        hashed = payload == "hash"
        detail = _QUOTING_DETAILS.get(reason, detail)
        return cls(reason, detail[:_DETAIL_MAX_CHARS], topic, partition, offset, None, None, payload=payload,
                   key_size=len(key) if key is not None else None,
                   value_size=len(value) if value is not None else None,
                   key_sha256=_digest(key) if hashed else None, value_sha256=_digest(value) if hashed else None)

    def to_bytes(self, max_bytes: int = DEAD_LETTER_MAX_BYTES) -> bytes:
        out = _letter_json(self, self.key, self.value)
        if len(out) <= max_bytes or self.truncated:
            return out
        return self.truncate(max_bytes).to_bytes(max_bytes)

    def truncate(self, max_bytes: int = DEAD_LETTER_MAX_BYTES) -> DeadLetter:
        """This (untruncated) dead letter with prefixes of the key and value that fit in
        `max_bytes`, their original sizes and sha256 hashes."""
        import dataclasses

        digest = _digest
        base = dataclasses.replace(
            self, detail=self.detail[:_DETAIL_MAX_CHARS], truncated=True,
            key=self.key[:DEAD_LETTER_MAX_KEY_BYTES] if self.key is not None else None,
            value=b"" if self.value is not None else None,
            key_size=len(self.key) if self.key is not None else None,
            value_size=len(self.value) if self.value is not None else None,
            key_sha256=digest(self.key), value_sha256=digest(self.value),
        )
        if self.value is None:
            return base
        room = max_bytes - len(_letter_json(base, base.key, base.value))
        keep = max(0, room) // 4 * 3  # base64: 4 characters per 3 bytes
        return dataclasses.replace(base, value=self.value[:keep])

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
            truncated=bool(d.get("truncated", False)),
            key_size=d.get("key_size"),
            value_size=d.get("value_size"),
            key_sha256=d.get("key_sha256"),
            value_sha256=d.get("value_sha256"),
            payload=d.get("payload", "full"),
        )


def _digest(b: bytes | None) -> str | None:
    import hashlib

    return hashlib.sha256(b).hexdigest() if b is not None else None


def _letter_json(d: DeadLetter, key: bytes | None, value: bytes | None) -> bytes:
    """The dead letter `d` as JSON, with `key` and `value` as its bytes."""
    import base64

    fields: dict[str, object] = {
        "reason": d.reason,
        "detail": d.detail,
        "topic": d.topic,
        "partition": d.partition,
        "offset": d.offset,
        "key_b64": base64.b64encode(key).decode() if key is not None else None,
        "value_b64": base64.b64encode(value).decode() if value is not None else None,
    }
    if d.truncated:
        fields.update(truncated=True, key_size=d.key_size, value_size=d.value_size,
                      key_sha256=d.key_sha256, value_sha256=d.value_sha256)
    elif d.payload != "full":
        fields.update(payload=d.payload, key_size=d.key_size, value_size=d.value_size)
        if d.payload == "hash":
            fields.update(key_sha256=d.key_sha256, value_sha256=d.value_sha256)
    return json.dumps(fields, separators=(",", ":")).encode()
