"""One typed reader for every encoding of the vector topic.

    from clickvec.client import decode_vector
    v = decode_vector(msg.value(), msg.key())                        # json, f16, i8, Avro
    v = decode_vector(msg.value(), registry="http://registry:8081")  # Avro: the registered schema

Fields a later contract version adds are ignored (clickvec/contract/__init__.py states
the evolution rules). Imports numpy and orjson only; Avro needs the `registry` extra.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from clickvec.contract.messages import vector_fields


@dataclass(frozen=True, slots=True)
class Vector:
    """A user's vector after one event."""

    user_id: str
    model_id: str
    seq: int  # events applied to the user's state, this one included; drop duplicates by it
    event_ts: int  # epoch ms of the event
    emit_ts: int  # epoch ms when the worker produced it
    vector: np.ndarray  # float32, 1-d
    surprise: float
    source: str  # "topic[partition]@offset" of the event


_FIELDS = ("user_id", "model_id", "seq", "event_ts", "emit_ts", "vector", "surprise", "source")


def decode_vector(value: bytes | None, key: bytes | None = None, *, registry: Any = None) -> Vector | None:
    """The `Vector` in a message of the vector topic, or None for a tombstone (a null
    value: the user was forgotten).

    `registry`: a Schema Registry URL or a confluent-kafka SchemaRegistryClient. With it,
    Avro messages are read with the exact schema registered under their frame's id;
    without it, with this contract's vector schema. Other encodings need no registry.
    `key`: the message key, taken as the user id when the value carries none.
    Raises ValueError for bytes that are no vector message.
    """
    if value is None:
        return None
    if registry is not None and value[:1] == b"\x00":
        from clickvec.contract.avro import frame_schema_id, read_avro_frame

        d = read_avro_frame(value, _schema_text(_client(registry), frame_schema_id(value)))
        if not isinstance(d, dict):
            raise ValueError("an Avro vector message must be a record")
    else:
        d = vector_fields(value)
    if not d.get("user_id") and key is not None:
        d["user_id"] = key.decode("utf-8", "replace")
    missing = [f for f in _FIELDS if f not in d]
    if missing:
        raise ValueError(f"not a vector message: no {', '.join(missing)}")
    return Vector(str(d["user_id"]), str(d["model_id"]), int(d["seq"]), int(d["event_ts"]),  # type: ignore[call-overload]
                  int(d["emit_ts"]), np.asarray(d["vector"], dtype=np.float32), float(d["surprise"]),  # type: ignore[arg-type]
                  str(d["source"]))


@functools.lru_cache(maxsize=8)
def _client_for(url: str) -> Any:
    from confluent_kafka.schema_registry import SchemaRegistryClient

    return SchemaRegistryClient.new_client({"url": url})


def _client(registry: Any) -> Any:
    return _client_for(registry) if isinstance(registry, str) else registry


def _schema_text(client: Any, schema_id: int) -> str:
    """The registered schema of `schema_id` (the registry client caches it)."""
    schema = client.get_schema(schema_id)
    if schema.schema_type not in (None, "AVRO"):
        raise ValueError(f"schema id {schema_id} is {schema.schema_type}, not an Avro vector schema")
    return str(schema.schema_str)
