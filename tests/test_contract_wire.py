"""The wire contract without a broker: every message kind read back with fields this
version does not know (a later version's additions) ignored; the Schema Registry formats
round-trip through confluent-kafka's serializers and its in-memory registry (`mock://`,
the allowed stand-in: no registry server installs here); decoding errors become precise
dead-letter reasons; the dead-letter payload policy; the schema files agree with the code."""

from __future__ import annotations

import io
import json
import re
import struct

import fastavro
import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clickvec.client import Vector, decode_vector
from clickvec.contract import CONTRACT_VERSION
from clickvec.contract.avro import schema_text
from clickvec.contract.event_pb import EVENT_FIELDS, event_message_class
from clickvec.contract.events import ClickEvent, EventError, parse_event
from clickvec.contract.messages import (
    DeadLetter,
    VectorMessage,
    dead_letter_key,
)
from clickvec.contract.registry import (
    EventReader,
    RegistrySettingsError,
    VectorAvroWriter,
    WireSettings,
    event_serializer,
    key_serializer,
    registry_client,
)

# Extra fields a later contract version might add: names the current one does not use.
_KNOWN = {"user_id", "model_id", "seq", "event_ts", "emit_ts", "vector", "surprise", "source", "item_id",
          "event_type", "ts", "category", "amount", "session_id", "reason", "detail", "topic", "partition",
          "offset", "key_b64", "value_b64", "truncated", "key_size", "value_size", "key_sha256", "value_sha256",
          "payload"}
_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).filter(lambda n: n not in _KNOWN)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)
_extras = st.dictionaries(_names, _json_values, min_size=1, max_size=4)
_f32 = st.floats(-1e4, 1e4, width=32)  # within float16 range: the f16 encoding stays finite
_vectors = st.builds(
    VectorMessage, user_id=st.text(min_size=1, max_size=20), model_id=st.text(max_size=20),
    seq=st.integers(1, 2**40), event_ts=st.integers(0, 2**45), emit_ts=st.integers(0, 2**45),
    vector=st.lists(_f32, min_size=1, max_size=16).map(lambda v: np.asarray(v, dtype=np.float32)),
    surprise=st.floats(allow_nan=False, allow_infinity=False), source=st.text(max_size=30))


def _with_extra_json(data: bytes, extra: dict) -> bytes:
    d = json.loads(data)
    return json.dumps({**extra, **d} if len(extra) % 2 else {**d, **extra}).encode()  # before or after


def _with_extra_meta(data: bytes, extra: dict) -> bytes:
    (n,) = struct.unpack_from("<H", data, 2)
    meta = json.dumps({**json.loads(data[4:4 + n]), **extra}).encode()
    return data[:2] + struct.pack("<H", len(meta)) + meta + data[4 + n:]


def _same(a: VectorMessage | Vector, b: VectorMessage, exact: bool = True) -> None:
    assert (a.user_id, a.model_id, a.seq, a.event_ts, a.emit_ts, a.source) == \
        (b.user_id, b.model_id, b.seq, b.event_ts, b.emit_ts, b.source)
    got, want = np.asarray(a.vector, np.float32), np.asarray(b.vector, np.float32)
    if exact:
        assert got.tobytes() == want.tobytes()
        assert a.surprise == b.surprise
    else:
        assert got.shape == want.shape


@settings(max_examples=30, deadline=None)
@given(m=_vectors, extra=_extras)
def test_every_vector_encoding_reads_back_with_unknown_fields(m, extra):
    assert CONTRACT_VERSION == 1
    for enc, add in (("json", _with_extra_json), ("f16", _with_extra_meta), ("i8", _with_extra_meta)):
        data = add(m.to_bytes(enc), extra)
        exact = enc == "json"
        _same(VectorMessage.from_bytes(data), m, exact)
        v = decode_vector(data, m.user_id.encode())
        _same(v, m, exact)
        assert v.vector.dtype == np.float32


@settings(max_examples=30, deadline=None)
@given(extra=_extras, value=st.one_of(st.none(), st.binary(max_size=64)), key=st.one_of(st.none(), st.binary(max_size=16)),
       policy=st.sampled_from(["full", "hash", "none"]))
def test_dead_letters_read_back_with_unknown_fields(extra, value, key, policy):
    dl = DeadLetter.of("not_json", "Expecting value", "clicks", 3, 17, key, value, policy)
    back = DeadLetter.from_bytes(_with_extra_json(dl.to_bytes(), extra))
    assert back == dl


@settings(max_examples=30, deadline=None)
@given(extra=_extras, amount=st.one_of(st.none(), st.floats(0, 1e6)))
def test_json_events_read_back_with_unknown_fields(extra, amount):
    ev = ClickEvent("u1", "i1", "cart", 1_700_000_000_000, "c", amount, None)
    assert parse_event(_with_extra_json(ev.to_bytes(), extra)) == ev


# ------------------------------------------------------------------ registry formats

def _evolved_avro(base: str, extra: dict) -> str:
    """`base` with fields appended, as a later contract version would add them."""
    s = json.loads(base)
    s["fields"] += [{"name": n, "type": ["null", "string"], "default": None} for n in extra]
    return json.dumps(s)


_evolve_client: list = []


@settings(max_examples=8, deadline=None)
@given(m=_vectors, extra=_extras)
def test_avro_vectors_with_appended_fields_read_back(m, extra):
    if not _evolve_client:
        _evolve_client.append(registry_client(WireSettings(registry="mock://evolve")))
    client = _evolve_client[0]
    schema = _evolved_avro(schema_text("vector.avsc"), extra)
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    rec = {"user_id": m.user_id, "model_id": m.model_id, "seq": m.seq, "event_ts": m.event_ts,
           "emit_ts": m.emit_ts, "vector": m.vector.tolist(), "surprise": m.surprise, "source": m.source,
           **{n: str(v) for n, v in extra.items()}}
    data = AvroSerializer(client, schema)(rec, SerializationContext("vectors", MessageField.VALUE))
    _same(decode_vector(data, registry=client), m)  # the registered (evolved) schema
    _same(decode_vector(data), m)  # this contract's schema: stops before the appended fields
    _same(VectorMessage.from_bytes(data), m)


def test_registry_event_formats_round_trip_and_ignore_unknown_fields():
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.schema_registry.json_schema import JSONSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    ev = ClickEvent("42", "item-9", "purchase", 1_700_000_000_123, "shoes", 19.5, "s1")
    bare = ClickEvent("42", "item-9", "view", 1_700_000_000_124)
    ctx = SerializationContext("clicks", MessageField.VALUE)
    for fmt in ("avro", "jsonschema", "protobuf"):
        s = WireSettings(in_format=fmt, key_mode="registry", registry=f"mock://{fmt}")
        client = registry_client(s)
        reader = EventReader(s, client)
        ser, keys = event_serializer(client, fmt), key_serializer(client, "long")
        for e in (ev, bare):
            assert reader.event(keys(42, "clicks"), ser(e, "clicks"), "clicks") == e, fmt
        # A producer's newer schema with fields clickvec does not know.
        if fmt == "avro":
            newer = _evolved_avro(schema_text("event.avsc"), {"device": 1})
            data = AvroSerializer(client, newer)({**ev.to_dict(), "device": "phone"}, ctx)
        elif fmt == "jsonschema":
            data = JSONSerializer(schema_text("event.schema.json"), client)({**ev.to_dict(), "device": "x"}, ctx)
        else:
            data = ser(ev, "clicks") + b"\x82\x01\x05phone"  # field 16, length-delimited: unknown
        assert reader.event(keys(42, "clicks"), data, "clicks") == ev, fmt
        # Keys: a string key, a record key with user_id, and --key ignore / user.
        assert reader.event(key_serializer(client, "string")("42", "clicks"), data, "clicks") == ev
        rec_key = AvroSerializer(client, '{"type":"record","name":"K","fields":[{"name":"user_id","type":"long"}]}')
        assert reader.event(rec_key({"user_id": 42}, SerializationContext("clicks", MessageField.KEY)), data,
                            "clicks") == ev
        assert EventReader(WireSettings(in_format=fmt, key_mode="ignore", registry="m"), client).event(
            None, data, "clicks") == ev
        assert EventReader(WireSettings(in_format=fmt, registry="m"), client).event(b"42", data, "clicks") == ev


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


_event_readers: dict[str, tuple] = {}


def _event_reader(fmt: str) -> tuple:
    if fmt not in _event_readers:
        s = WireSettings(in_format=fmt, registry=f"mock://extra-{fmt}")
        client = registry_client(s)
        _event_readers[fmt] = (client, EventReader(s, client), event_serializer(client, fmt))
    return _event_readers[fmt]


@settings(max_examples=10, deadline=None)
@given(extra=st.dictionaries(_names, st.text(max_size=20), min_size=1, max_size=4),
       amount=st.one_of(st.none(), st.floats(0, 1e6)))
def test_registry_events_read_back_with_unknown_fields(extra, amount):
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.schema_registry.json_schema import JSONSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    ev = ClickEvent("u5", "i5", "click", 1_700_000_000_000, None, amount, "s")
    ctx = SerializationContext("clicks", MessageField.VALUE)
    for fmt in ("avro", "jsonschema", "protobuf"):
        client, reader, ser = _event_reader(fmt)
        if fmt == "avro":  # a producer's newer schema, the extra fields appended
            rec = {**dict.fromkeys(("category", "amount", "session_id")), **ev.to_dict(), **extra}
            data = AvroSerializer(client, _evolved_avro(schema_text("event.avsc"), extra))(rec, ctx)
        elif fmt == "jsonschema":
            data = JSONSerializer(schema_text("event.schema.json"), client)({**extra, **ev.to_dict()}, ctx)
        else:  # fields 16, 17, ... that this contract's message does not declare
            data = ser(ev, "clicks") + b"".join(
                _varint((16 + i) << 3 | 2) + _varint(len(v.encode())) + v.encode()
                for i, v in enumerate(extra.values()))
        assert reader.event(b"u5", data, "clicks") == ev, fmt


def _reason(reader: EventReader, key, value) -> str:
    with pytest.raises(EventError) as e:
        reader.event(key, value, "clicks")
    return e.value.reason


def test_decoding_errors_are_precise_reasons():
    s = WireSettings(in_format="avro", key_mode="registry", registry="mock://errors")
    client = registry_client(s)
    reader = EventReader(s, client)
    ser, keys = event_serializer(client, "avro"), key_serializer(client, "long")
    good = ser(ClickEvent("7", "i", "view", 1_700_000_000_000), "clicks")
    k7 = keys(7, "clicks")
    assert _reason(reader, k7, b'{"user_id":"7"}') == "bad_framing"
    assert _reason(reader, k7, b"\x00\x00\x00\x00\x63" + good[5:]) == "unknown_schema"
    assert _reason(reader, k7, good[:5] + b"\xff\xff\xff\xff\xff\xff") == "undecodable"
    assert _reason(reader, k7, None) == "empty_message"
    assert _reason(reader, keys(8, "clicks"), good) == "key_mismatch"
    assert _reason(reader, b"7", good) == "bad_key"  # not framed
    assert _reason(reader, None, good) == "bad_key"
    bool_key = key_serializer(client, "boolean")(True, "clicks")
    assert _reason(reader, bool_key, good) == "bad_key"
    # Decoded, then checked as JSON events are: same reasons.
    assert _reason(reader, k7, ser(ClickEvent("7", "i", "view", 5), "clicks")) == "ts_out_of_range"
    js = WireSettings(in_format="jsonschema", key_mode="ignore", registry="mock://js")
    jclient = registry_client(js)
    from confluent_kafka.schema_registry.json_schema import JSONSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    loose = JSONSerializer('{"type":"object"}', jclient, conf={"validate": False})
    ctx = SerializationContext("other", MessageField.VALUE)
    bad = loose({"user_id": "7", "item_id": "i", "event_type": "view", "ts": "soon"}, ctx)
    jreader = EventReader(js, jclient)
    assert _reason(jreader, None, bad) == "wrong_type"
    strict = event_serializer(jclient, "jsonschema")(ClickEvent("7", "i", "view", 1_700_000_000_000), "clicks")
    tampered = strict.replace(b"1700000000000", b'"1700000000000"')
    assert _reason(jreader, None, tampered) == "schema_violation"
    assert _reason(jreader, None, strict[:5] + b"{not json") == "undecodable"
    pb = WireSettings(in_format="protobuf", key_mode="ignore", registry="mock://pb")
    pclient = registry_client(pb)
    pgood = event_serializer(pclient, "protobuf")(ClickEvent("7", "i", "view", 1_700_000_000_000), "clicks")
    assert _reason(EventReader(pb, pclient), None, pgood[:6] + b"\x0a\xff\xff") == "undecodable"


def test_mock_registries_seeded_alike_agree_on_ids():
    s = WireSettings(in_format="avro", key_mode="registry", out_format="avro", registry="mock://a",
                     in_topic="src", out_topic="vec")
    a, b = registry_client(s), registry_client(s)
    ids = {subj: a.get_latest_version(subj).schema_id for subj in a.get_subjects()}
    assert ids == {subj: b.get_latest_version(subj).schema_id for subj in b.get_subjects()}
    assert set(ids) == {"src-value", "src-key", "vec-value"}
    m = VectorMessage("u", "m", 1, 2, 3, np.ones(4, np.float32), 0.25, "src[0]@0")
    data = VectorAvroWriter(b, "vec")(m)
    assert struct.unpack_from(">I", data, 1)[0] == ids["vec-value"]
    schema = fastavro.parse_schema(json.loads(a.get_schema(ids["vec-value"]).schema_str))
    rec = fastavro.schemaless_reader(io.BytesIO(data[5:]), schema)
    assert rec["vector"] == [1.0] * 4 and rec["user_id"] == "u"


def test_settings_errors_are_one_line():
    cases = {
        WireSettings(in_format="xml"): "--in-format must be one of",
        WireSettings(key_mode="both"): "--key must be one of",
        WireSettings(in_format="avro"): "--in-format avro needs a Schema Registry: --registry URL",
        WireSettings(key_mode="registry", out_format="avro"): "--key registry and --out-format avro need",
    }
    for s, text in cases.items():
        with pytest.raises(RegistrySettingsError) as e:
            s.check()
        assert text in str(e.value) and "\n" not in str(e.value)


def test_missing_registry_extra_is_one_line(monkeypatch):
    from clickvec.contract import registry
    from clickvec.contract.avro import MissingExtraError

    monkeypatch.setitem(__import__("sys").modules, "fastavro", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'clickvec\[registry\]'"):
        registry.WireSettings(in_format="avro", registry="mock://x").check()


# ------------------------------------------------------------------ dead-letter payload policy

def test_dead_letter_payload_policy():
    key, value = b"user-17", b'{"user_id":"user-17","bad":' + b"x" * 100
    full = DeadLetter.from_bytes(DeadLetter.of("key_mismatch", "key 'user-17' vs 'u'", "c", 0, 5, key, value).to_bytes())
    assert (full.key, full.value, full.payload) == (key, value, "full")
    hashed = json.loads(DeadLetter.of("key_mismatch", "key 'user-17' vs 'u'", "c", 0, 5, key, value, "hash").to_bytes())
    import hashlib

    assert hashed["key_b64"] is None and hashed["value_b64"] is None and hashed["payload"] == "hash"
    assert hashed["value_sha256"] == hashlib.sha256(value).hexdigest() and hashed["value_size"] == len(value)
    assert hashed["key_sha256"] == hashlib.sha256(key).hexdigest() and hashed["key_size"] == len(key)
    assert "user-17" not in json.dumps(hashed)  # nor in the detail
    none = json.loads(DeadLetter.of("not_json", "Expecting value", "c", 0, 5, key, value, "none").to_bytes())
    assert none["value_size"] == len(value) and "value_sha256" not in none and none["detail"] == "Expecting value"
    assert dead_letter_key(key, "full") == key and dead_letter_key(key, "none") is None
    assert dead_letter_key(key, "hash") == hashlib.sha256(key).hexdigest().encode()
    with pytest.raises(ValueError):
        DeadLetter.of("not_json", "", "c", 0, 5, key, value, "some")


# ------------------------------------------------------------------ schema files

def test_schema_files_agree_with_the_code():
    for name in ("event.avsc", "vector.avsc"):
        fastavro.parse_schema(json.loads(schema_text(name)))
    vec_schema = json.loads(schema_text("vector.schema.json"))
    ev_schema = json.loads(schema_text("event.schema.json"))
    m = VectorMessage("u", "m", 1, 2, 3, np.ones(3, np.float32), 0.5, "clicks[0]@1")
    for enc in ("json", "f16"):
        jsonschema.validate(json.loads(VectorMessage.from_bytes(m.to_bytes(enc)).to_bytes()), vec_schema)
    jsonschema.validate(json.loads(ClickEvent("u", "i", "view", 1_700_000_000_000, amount=1.0).to_bytes()), ev_schema)
    assert [f["name"] for f in json.loads(schema_text("vector.avsc"))["fields"]] == list(vec_schema["required"])
    # event.proto (text, for producers) and the descriptor built in code: same fields.
    text = schema_text("event.proto")
    found = re.findall(r"^\s*(optional\s+)?(\w+)\s+(\w+)\s*=\s*(\d+);", text, re.M)
    proto_type = {"TYPE_STRING": "string", "TYPE_INT64": "int64", "TYPE_DOUBLE": "double"}
    assert [(n, int(num), t, bool(o)) for o, t, n, num in found] == \
        [(n, num, proto_type[t], o) for n, num, t, o in EVENT_FIELDS]
    assert event_message_class().DESCRIPTOR.full_name == "clickvec.v1.ClickEvent"
    assert decode_vector(None) is None
