"""The contract's schema files (package data under clickvec/contract/schemas/) and the
Avro reading that needs no registry: an Avro vector message in Confluent framing read
with this contract's own vector schema.

The schema files are read from the installed package, never from deploy/, so a wheel
install has them. fastavro comes with the `registry` extra; without it only the Avro
paths fail, with a one-line error naming the extra.
"""

from __future__ import annotations

import functools
import io
import json
import struct
from importlib import resources
from typing import Any

from clickvec.errors import ClickvecError

SCHEMA_FILES = ("event.avsc", "vector.avsc", "event.schema.json", "vector.schema.json", "event.proto")
FRAME_MAGIC = 0  # Confluent wire framing: magic byte 0, 4-byte big-endian schema id, payload
FRAME_HEADER = 5

EXTRA_HINT = "pip install 'clickvec[registry]'"


class MissingExtraError(ClickvecError):
    """A Schema Registry format was asked for, but the `registry` extra is not
    installed. Action: pip install 'clickvec[registry]'."""


def schema_text(name: str) -> str:
    """One of `SCHEMA_FILES`, as text."""
    if name not in SCHEMA_FILES:
        raise ValueError(f"unknown schema file {name!r}; one of {SCHEMA_FILES}")
    return resources.files("clickvec.contract").joinpath("schemas", name).read_text(encoding="utf-8")


def _fastavro() -> Any:
    try:
        import fastavro
    except ImportError:
        raise MissingExtraError(f"reading Avro needs fastavro, from the registry extra: {EXTRA_HINT}") from None
    return fastavro


@functools.lru_cache(maxsize=64)
def parse_avro_schema(text: str) -> Any:
    """fastavro's parsed form of an Avro schema text (cached: registries hand out the
    same few schemas for every message)."""
    return _fastavro().parse_schema(json.loads(text))


def frame_schema_id(data: bytes) -> int:
    """The schema id of a Confluent-framed message; ValueError if it is not framed."""
    if len(data) < FRAME_HEADER or data[0] != FRAME_MAGIC:
        raise ValueError("not Confluent wire framing (magic byte 0 and a 4-byte schema id)")
    return int(struct.unpack_from(">I", data, 1)[0])


def read_avro_frame(data: bytes, schema_text_: str) -> Any:
    """The Avro payload of a Confluent-framed message, read with `schema_text_` (the
    writer's schema: the one registered under the frame's id, or this contract's)."""
    frame_schema_id(data)
    try:
        return _fastavro().schemaless_reader(io.BytesIO(data[FRAME_HEADER:]), parse_avro_schema(schema_text_))
    except (EOFError, IndexError, ValueError, TypeError, OverflowError, UnicodeDecodeError, StopIteration) as e:
        raise ValueError(f"Avro payload does not decode: {type(e).__name__}: {e}"[:200]) from None


def read_vector_frame(data: bytes) -> dict[str, Any]:
    """An Avro vector message as the worker writes it (`--encoding avro`), read with this
    contract's vector schema. A later contract version may append fields; this reader
    stops before them (Avro reads fields in order), so such messages still read. With a
    registry at hand, `clickvec.client.decode_vector(..., registry=...)` reads with the
    exact registered schema instead."""
    d = read_avro_frame(data, schema_text("vector.avsc"))
    if not isinstance(d, dict):
        raise ValueError("an Avro vector message must be a record")
    return d
