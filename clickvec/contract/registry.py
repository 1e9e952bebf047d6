"""Schema Registry wire formats, through confluent-kafka's `schema_registry` serializers:
events in Avro, JSON Schema or Protobuf with Confluent wire framing, message keys
decoded by the registry, vectors out in Avro (subject `<topic>-value`).

`EventReader` is what the worker's engine calls for every event when a setting is not
the default (JSON values keyed by the user id string, which the engine parses itself).
Decoding errors raise `EventError` with a reason from `WIRE_ERROR_REASONS`; a registry
that cannot be asked (down, refusing credentials) raises `RegistryUnavailableError`,
which stops the worker without acking the batch, rather than dead-lettering every
event while it is away.

A `mock://NAME` registry is confluent-kafka's in-memory one, per process. `registry_client`
seeds such a registry with the contract's schemas in a fixed order (`seed_mock_registry`),
so two processes with the same settings (a test producer and the worker) get the same
schema ids. A real registry is not seeded: producers register their schemas.

Needs the `registry` extra (fastavro, protobuf, the registry client's HTTP stack).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from clickvec.contract.avro import (
    EXTRA_HINT,
    FRAME_HEADER,
    FRAME_MAGIC,
    MissingExtraError,
    schema_text,
)
from clickvec.contract.events import (
    MAX_MESSAGE_BYTES,
    ClickEvent,
    EventError,
    event_of,
    parse_event,
)
from clickvec.contract.messages import OUT_FORMATS, VectorMessage
from clickvec.contract.topics import DEFAULT_IN_TOPIC, DEFAULT_OUT_TOPIC
from clickvec.errors import ClickvecError

EVENT_FORMATS = ("json", "avro", "jsonschema", "protobuf")
KEY_MODES = ("user", "ignore", "registry")
# Registry keys (--key registry) are Avro: a string or long user id, or a record with a
# `user_id` field. A mock registry is seeded with these two primitive key schemas.
KEY_SCHEMAS = ("string", "long")
_KEY_CACHE = 200_000  # decoded registry keys kept (about 100 bytes each)

# Decoding errors of fastavro, protobuf and the JSON parser on bytes that are not what
# their schema says.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    EOFError, IndexError, ValueError, TypeError, KeyError, OverflowError, UnicodeDecodeError,
    StopIteration, AttributeError,
)


class RegistrySettingsError(ClickvecError):
    """Settings of the wire formats that cannot work together (a registry format without
    --registry, an unknown format). Action: fix the flags named."""


class RegistryUnavailableError(ClickvecError):
    """The Schema Registry could not be asked (unreachable, refused the credentials, an
    error other than "not found"). The worker stops without acking the batch; a restart
    processes it again. Action: check --registry and --registry-auth."""


@dataclass(frozen=True)
class WireSettings:
    """How the worker reads events and keys and writes vectors."""

    in_format: str = "json"  # EVENT_FORMATS
    key_mode: str = "user"  # KEY_MODES
    out_format: str = "json"  # OUT_FORMATS
    registry: str = ""  # Schema Registry URL; mock://NAME: confluent-kafka's in-memory registry
    registry_auth: str = ""  # USER:PASSWORD, the registry's basic auth
    in_topic: str = DEFAULT_IN_TOPIC
    out_topic: str = DEFAULT_OUT_TOPIC

    def uses_registry(self) -> bool:
        return self.in_format != "json" or self.key_mode == "registry" or self.out_format == "avro"

    def is_default(self) -> bool:
        """JSON events keyed by the user id string: the engine's own fast path."""
        return self.in_format == "json" and self.key_mode == "user"

    def check(self) -> None:
        """One-line errors for settings that cannot work, the missing extra included."""
        for name, value, allowed in (("--in-format", self.in_format, EVENT_FORMATS),
                                     ("--key", self.key_mode, KEY_MODES),
                                     ("--out-format", self.out_format, OUT_FORMATS)):
            if value not in allowed:
                raise RegistrySettingsError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not self.uses_registry():
            return
        if not self.registry:
            why = [f"--in-format {self.in_format}"] if self.in_format != "json" else []
            why += ["--key registry"] if self.key_mode == "registry" else []
            why += ["--out-format avro"] if self.out_format == "avro" else []
            verb = "needs" if len(why) == 1 else "need"
            raise RegistrySettingsError(f"{' and '.join(why)} {verb} a Schema Registry: --registry URL")
        _require_extra()


def _require_extra() -> None:
    try:
        import confluent_kafka.schema_registry.avro  # noqa: F401
        import confluent_kafka.schema_registry.json_schema  # noqa: F401
        import confluent_kafka.schema_registry.protobuf  # noqa: F401
        import fastavro  # noqa: F401
    except ImportError as e:
        raise MissingExtraError(f"the Schema Registry formats need the registry extra ({e.name} is missing): "
                                f"{EXTRA_HINT}") from None


def _strategy_conf() -> dict[str, Any]:
    # Subjects are `<topic>-key` / `<topic>-value` (TopicNameStrategy), named without
    # asking the registry for subject associations.
    from confluent_kafka.schema_registry import topic_subject_name_strategy

    return {"subject.name.strategy": topic_subject_name_strategy}


def registry_client(settings: WireSettings) -> Any:
    """A SchemaRegistryClient for `settings.registry`; a mock:// one comes seeded."""
    _require_extra()
    from confluent_kafka.schema_registry import SchemaRegistryClient

    conf: dict[str, Any] = {"url": settings.registry}
    if settings.registry_auth:
        conf["basic.auth.user.info"] = settings.registry_auth
    client = SchemaRegistryClient.new_client(conf)
    if settings.registry.startswith("mock://"):
        seed_mock_registry(client, settings)
    return client


def check_registry(settings: WireSettings, timeout: float = 5.0) -> None:
    """At start-up: a real registry answers, or RegistryUnavailableError in one line
    within about `timeout` seconds (a mock:// one always does)."""
    if not settings.uses_registry() or settings.registry.startswith("mock://"):
        return
    _require_extra()
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    conf: dict[str, Any] = {"url": settings.registry, "timeout": timeout, "max.retries": 0}
    if settings.registry_auth:
        conf["basic.auth.user.info"] = settings.registry_auth
    try:
        _asking(SchemaRegistryClient(conf).get_subjects)
    except SchemaRegistryError as e:
        raise RegistryUnavailableError(f"the Schema Registry at {settings.registry} refused: {e}") from None
    except RegistryUnavailableError as e:
        raise RegistryUnavailableError(f"{e} ({settings.registry})") from None


_SAMPLE = ClickEvent("0", "0", "view", 946_684_800_000)


def seed_mock_registry(client: Any, settings: WireSettings) -> None:
    """Register the contract's schemas the way producers would (by serializing one
    sample), in a fixed order: the event schema of `in_format` under `<in>-value`, the
    key schemas under `<in>-key` (--key registry), the vector schema under `<out>-value`
    (--out-format avro). The same settings give the same ids in every process."""
    if settings.in_format != "json":
        event_serializer(client, settings.in_format)(_SAMPLE, settings.in_topic)
    if settings.key_mode == "registry":
        for avro_type in KEY_SCHEMAS:
            key_serializer(client, avro_type)(0 if avro_type == "long" else "0", settings.in_topic)
    if settings.out_format == "avro":
        VectorAvroWriter(client, settings.out_topic)(VectorMessage("0", "", 0, 0, 0, [0.0], 0.0, ""))


# ------------------------------------------------------------------ producers' side

def event_serializer(client: Any, fmt: str) -> Callable[[ClickEvent, str], bytes]:
    """`f(event, topic)`: the event framed in `fmt` with this contract's schema (registered
    under `<topic>-value` on first use). For producers and tests."""
    from confluent_kafka.serialization import MessageField, SerializationContext

    def ctx(topic: str) -> Any:
        return SerializationContext(topic, MessageField.VALUE)

    if fmt == "avro":
        from confluent_kafka.schema_registry.avro import AvroSerializer

        avro = AvroSerializer(client, schema_text("event.avsc"), conf=_strategy_conf())
        return lambda ev, topic: avro({**dict.fromkeys(("category", "amount", "session_id")), **ev.to_dict()},
                                      ctx(topic))
    if fmt == "jsonschema":
        from confluent_kafka.schema_registry.json_schema import JSONSerializer

        js = JSONSerializer(schema_text("event.schema.json"), client, conf=_strategy_conf())
        return lambda ev, topic: js(ev.to_dict(), ctx(topic))
    if fmt == "protobuf":
        from confluent_kafka.schema_registry.protobuf import ProtobufSerializer

        from clickvec.contract.event_pb import event_message_class

        cls = event_message_class()
        pb = ProtobufSerializer(cls, client, conf={**_strategy_conf(), "use.deprecated.format": False})
        return lambda ev, topic: pb(cls(**ev.to_dict()), ctx(topic))
    raise RegistrySettingsError(f"no registry serializer for event format {fmt!r}")


def key_serializer(client: Any, avro_type: str = "string") -> Callable[[Any, str], bytes]:
    """`f(user_id, topic)`: a message key in Avro (`avro_type`: string or long),
    registered under `<topic>-key`."""
    import json

    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    ser = AvroSerializer(client, json.dumps(avro_type), conf=_strategy_conf())
    return lambda key, topic: ser(key, SerializationContext(topic, MessageField.KEY))


class VectorAvroWriter:
    """Vector messages in Avro, Confluent framing, the contract's vector schema
    registered under `<topic>-value` on first use."""

    def __init__(self, client: Any, topic: str) -> None:
        from confluent_kafka.schema_registry.avro import AvroSerializer
        from confluent_kafka.serialization import MessageField, SerializationContext

        self._ser = AvroSerializer(client, schema_text("vector.avsc"), conf=_strategy_conf())
        self._ctx = SerializationContext(topic, MessageField.VALUE)

    def __call__(self, m: VectorMessage) -> bytes:
        vec = m.vector.tolist() if isinstance(m.vector, np.ndarray) else list(m.vector)
        record = {"user_id": m.user_id, "model_id": m.model_id, "seq": m.seq, "event_ts": m.event_ts,
                  "emit_ts": m.emit_ts, "vector": vec, "surprise": float(m.surprise), "source": m.source}
        return _asking(lambda: self._ser(record, self._ctx))


def _asking(call: Callable[[], Any]) -> Any:
    """`call()`, with registry errors other than "not found" as RegistryUnavailableError."""
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    try:
        return call()
    except SchemaRegistryError as e:
        if e.http_status_code == 404:
            raise
        raise RegistryUnavailableError(f"the Schema Registry refused a request: {e}") from None
    except OSError as e:
        raise RegistryUnavailableError(f"the Schema Registry cannot be reached: {e}") from None
    except Exception as e:
        # The registry client's HTTP errors (httpx) share no base class we can import
        # without it; they are named for what they are.
        if type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2"):
            raise RegistryUnavailableError(f"the Schema Registry cannot be reached: {e}") from None
        raise


# ------------------------------------------------------------------ the worker's side

class EventReader:
    """Events and keys as `settings` say: `event(key, value, topic)` returns the
    `ClickEvent` or raises `EventError`. The decoders are chosen once, here."""

    def __init__(self, settings: WireSettings, client: Any = None) -> None:
        settings.check()
        if client is None and settings.uses_registry():
            client = registry_client(settings)
        self.key_mode = settings.key_mode
        self._value = _value_decoder(settings.in_format, client)
        self._key = _registry_key_decoder(client) if settings.key_mode == "registry" else None

    def user_of_key(self, key: bytes | None, topic: str) -> str:
        """The user id a message key names (a tombstone has nothing else to go by)."""
        if self.key_mode == "ignore":
            raise EventError("bad_key", "a tombstone names its user by its key, which --key ignore does not read")
        if self._key is not None:
            return self._key(key, topic)
        if not key:
            raise EventError("empty_message", "a tombstone (null value) needs the user id as its key")
        return key.decode("utf-8", "replace")

    def event(self, key: bytes | None, value: bytes | None, topic: str) -> ClickEvent:
        ev = self._value(value, topic)
        if self.key_mode == "ignore":
            return ev
        if self._key is not None:
            uid = self._key(key, topic)
        else:
            uid = key.decode("utf-8", "replace") if key is not None else None
        if uid != ev.user_id:
            # State lives on the partition of the key; an event keyed otherwise would be
            # applied on the wrong partition's state.
            raise EventError("key_mismatch", f"message key's user id {uid!r} is not the event's user_id "
                                             f"{ev.user_id!r}; key the source topic by user_id")
        return ev


def _framed(data: bytes | None, what: str) -> bytes:
    if data is None or len(data) == 0:
        raise EventError("empty_message", f"message {what} is empty")
    if len(data) > MAX_MESSAGE_BYTES:
        raise EventError("oversized_message", f"{len(data)} bytes > {MAX_MESSAGE_BYTES}")
    if len(data) <= FRAME_HEADER or data[0] != FRAME_MAGIC:
        raise EventError("bad_framing", f"message {what} is not in Confluent wire framing (magic byte 0, "
                                        "4-byte schema id, payload); was it written by a registry serializer?")
    return bytes(data)


def _deserializing(deser: Any, data: bytes, ctx: Any, what: str, violation: str) -> Any:
    """`deser(data, ctx)` with its errors as EventError reasons."""
    from confluent_kafka.schema_registry.error import SchemaRegistryError
    from confluent_kafka.serialization import SerializationError

    try:
        return _asking(lambda: deser(data, ctx))
    except SchemaRegistryError as e:  # only "not found" comes through _asking
        raise EventError("unknown_schema", f"the {what}'s schema id {int.from_bytes(data[1:5], 'big')} is not "
                                           f"in the registry ({e.error_message})") from None
    except SerializationError as e:
        raise EventError(violation, f"{what}: {e}"[:300]) from None
    except _DECODE_ERRORS as e:
        raise EventError("undecodable", f"{what} does not decode with its schema: {type(e).__name__}: {e}"[:300]) \
            from None
    except Exception as e:
        if type(e).__name__ == "DecodeError":  # google.protobuf.message.DecodeError
            raise EventError("undecodable", f"{what} does not decode with its schema: {e}"[:300]) from None
        raise


def _value_decoder(fmt: str, client: Any) -> Callable[[bytes | None, str], ClickEvent]:
    if fmt == "json":
        return lambda value, topic: parse_event(value)
    from confluent_kafka.serialization import MessageField, SerializationContext

    contexts: dict[str, Any] = {}
    to_fields: Callable[[Any], Any] = _avro_fields
    violation = "undecodable"
    if fmt == "avro":
        from confluent_kafka.schema_registry.avro import AvroDeserializer

        deser = AvroDeserializer(client, conf=_strategy_conf())
    elif fmt == "jsonschema":
        import orjson
        from confluent_kafka.schema_registry.json_schema import JSONDeserializer

        # Validated against the writer's registered schema; then checked as JSON events are.
        deser = JSONDeserializer(None, schema_registry_client=client, conf=_strategy_conf(), json_decode=orjson.loads)
        to_fields, violation = (lambda d: d), "schema_violation"
    elif fmt == "protobuf":
        from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer

        from clickvec.contract.event_pb import event_fields, event_message_class

        deser = ProtobufDeserializer(event_message_class(), {**_strategy_conf(), "use.deprecated.format": False},
                                     client)
        to_fields = event_fields
    else:
        raise RegistrySettingsError(f"--in-format must be one of {', '.join(EVENT_FORMATS)}, got {fmt!r}")

    def decode(value: bytes | None, topic: str) -> ClickEvent:
        ctx = contexts.get(topic)
        if ctx is None:
            ctx = contexts[topic] = SerializationContext(topic, MessageField.VALUE)
        obj = _deserializing(deser, _framed(value, "value"), ctx, "value", violation)
        return event_of(to_fields(obj))

    return decode


def _avro_fields(obj: Any) -> Any:
    # A producer's schema may declare ts as timestamp-millis, which fastavro hands back
    # as a datetime: the same instant in epoch milliseconds.
    if isinstance(obj, dict) and isinstance(obj.get("ts"), datetime.datetime):
        obj = {**obj, "ts": int(obj["ts"].timestamp() * 1000)}
    return obj


def _registry_key_decoder(client: Any) -> Callable[[bytes | None, str], str]:
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    deser = AvroDeserializer(client, conf=_strategy_conf())
    contexts: dict[str, Any] = {}
    # A user's key bytes are the same in every event (a schema id never changes what it
    # names), so each distinct key is decoded once: decoding is most of a key's cost.
    known: dict[tuple[str, bytes], str] = {}

    def decode(key: bytes | None, topic: str) -> str:
        uid = known.get((topic, key)) if key is not None else None
        if uid is None:
            uid = decode_new(key, topic)
            if len(known) >= _KEY_CACHE:
                known.clear()
            known[(topic, key)] = uid  # type: ignore[index]
        return uid

    def decode_new(key: bytes | None, topic: str) -> str:
        ctx = contexts.get(topic)
        if ctx is None:
            ctx = contexts[topic] = SerializationContext(topic, MessageField.KEY)
        try:
            obj = _deserializing(deser, _framed(key, "key"), ctx, "key", "bad_key")
        except EventError as e:
            if e.reason == "unknown_schema":
                raise
            raise EventError("bad_key", e.detail) from None
        if isinstance(obj, dict):
            obj = obj.get("user_id")
        if isinstance(obj, bool) or not isinstance(obj, (str, int)) or obj == "":
            raise EventError("bad_key", f"the key decodes to {type(obj).__name__}, not a user id (an Avro string "
                                        "or long, or a record with a user_id field)")
        return str(obj)

    return decode
