"""The JSON vector message has one writer (clickvec.contract.messages): the worker's
hot path and `VectorMessage.to_bytes` both use it. These tests check that its parts
agree with json.dumps, and that every message the engine emits is byte for byte what
`VectorMessage.to_bytes` writes for the same values."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clickvec.bundle.reader import load_bundle
from clickvec.contract.messages import (
    VectorMessage,
    vector_json,
    vector_json_head,
    vector_json_source,
)
from clickvec.devtools.synth import SynthConfig, generate_events
from clickvec.stream.worker.engine import Engine, MemoryStateStore, Record

_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(user_id=st.text(max_size=30), model_id=st.text(max_size=30), topic=st.text(max_size=30),
       partition=st.integers(0, 2**31 - 1), offset=st.integers(0, 2**62), seq=st.integers(0, 2**40),
       event_ts=st.integers(0, 2**45), emit_ts=st.integers(0, 2**45), vector=st.lists(_f32, max_size=40),
       surprise=st.floats(allow_nan=True, allow_infinity=True))
def test_json_writer_agrees_with_json_dumps(user_id, model_id, topic, partition, offset, seq, event_ts, emit_ts,
                                            vector, surprise):
    v = np.asarray(vector, dtype=np.float32)
    source = f"{topic}[{partition}]@{offset}"
    assert vector_json_source(topic, partition, offset) == json.dumps(source)
    data = vector_json(vector_json_head(user_id, model_id), seq, event_ts, emit_ts, v, surprise,
                       vector_json_source(topic, partition, offset))
    reference = json.dumps({"user_id": user_id, "model_id": model_id, "seq": seq, "event_ts": event_ts,
                            "emit_ts": emit_ts, "vector": [float(x) for x in v], "surprise": surprise,
                            "source": source}, separators=(",", ":"))
    # Everything but the vector's float text is json.dumps' own output...
    head, vec_and_rest = data.decode().split('"vector":', 1)
    assert reference.startswith(head + '"vector":')
    assert reference.endswith(vec_and_rest[vec_and_rest.index("]") + 1:])
    # ... and the vector's values read back to the same float32 values.
    back = np.asarray(json.loads(data)["vector"], dtype=np.float32)
    assert back.tobytes() == v.tobytes()
    assert data == VectorMessage(user_id, model_id, seq, event_ts, emit_ts, v, surprise, source).to_bytes()


@pytest.fixture(scope="module")
def bundle(stream_bundle_path):
    return load_bundle(stream_bundle_path, providers="cpu")


def test_engine_emits_what_the_message_class_writes(bundle):
    events = generate_events(SynthConfig(n_users=20, seed=3, mean_events=6))[:120]
    records = [Record(e.user_id.encode(), e.to_bytes(), "clicks", i % 3, i) for i, e in enumerate(events)]
    result = Engine(bundle).process(records, MemoryStateStore())
    assert len(result.outputs) == len(records)
    for key, value in result.outputs:
        d = json.loads(value)
        d["vector"] = np.asarray(d["vector"], dtype=np.float32)  # float32 text reads back exactly
        assert VectorMessage(**d).to_bytes() == value
        assert key == d["user_id"].encode()
