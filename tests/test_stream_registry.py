"""End to end on the real broker: Schema-Registry-framed events with Avro integer keys in,
Avro vectors out (`clickvec stream --in-format avro --key registry --out-format avro`).

The registry is confluent-kafka's in-memory one (`mock://`): no registry server installs
here. A mock registry lives in one process, and the worker is a child process: both
sides call `clickvec.contract.registry.registry_client` with the same settings, which
seeds each mock with the contract's schemas in the same fixed order, so the ids the test
producer frames with are the ids the worker looks up, and the id the worker frames its
vectors with is the test's id of the same schema. The vectors are read with fastavro and
the registered schema and must equal the offline encoder (max abs diff <= 1e-5).
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import subprocess
import time
from collections import defaultdict

import fastavro
import pytest
from stream_util import (
    TopicReader,
    VectorLog,
    WorkerProcess,
    check_vectors,
    read_dead_letters,
    wait_for,
)

from clickvec.bundle.reader import load_bundle
from clickvec.client import decode_vector
from clickvec.contract.events import ClickEvent
from clickvec.contract.messages import VectorMessage
from clickvec.contract.registry import (
    WireSettings,
    event_serializer,
    key_serializer,
    registry_client,
)
from clickvec.devtools.proc import clickvec_command, free_port
from clickvec.devtools.produce import produce_records
from clickvec.devtools.synth import SynthConfig, generate_events

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _events_with_integer_users(n_users: int, n_events: int, seed: int) -> list[ClickEvent]:
    """Synthetic events whose user ids are integers (as their decimal strings)."""
    evs = generate_events(SynthConfig(n_users=n_users, seed=seed, mean_events=n_events / n_users * 1.3))[:n_events]
    ids: dict[str, str] = {}
    return [ClickEvent(ids.setdefault(e.user_id, str(1000 + len(ids))), e.item_id, e.event_type, e.ts,
                       e.category, e.amount, e.session_id) for e in evs]


def test_avro_events_with_registry_keys_in_avro_vectors_out(kafka_bootstrap, new_topic, new_group,
                                                             stream_bundle_path, tmp_path):
    src, out, dlq = new_topic(4, "clicks"), new_topic(4, "vectors"), new_topic(4, "dlq")
    # A registry that does not answer stops the worker at start-up: one line, exit 2.
    t0 = time.monotonic()
    down = subprocess.run(clickvec_command("stream", "--model", str(stream_bundle_path), "--brokers", kafka_bootstrap,
                                           "--in", src, "--in-format", "avro",
                                           "--registry", f"http://127.0.0.1:{free_port()}"),
                          capture_output=True, text=True, timeout=120)
    assert down.returncode == 2, down.stderr
    assert down.stderr.startswith("clickvec stream: the Schema Registry cannot be reached"), down.stderr
    assert down.stderr.count("\n") == 1 and time.monotonic() - t0 < 60
    wire = WireSettings(in_format="avro", key_mode="registry", out_format="avro", registry="mock://e2e",
                        in_topic=src, out_topic=out)
    client = registry_client(wire)  # seeded as the worker seeds its own
    value_of, key_of = event_serializer(client, "avro"), key_serializer(client, "long")
    events = _events_with_integer_users(200, 2_000, seed=21)
    records: list[tuple[bytes | None, bytes]] = [(key_of(int(e.user_id), src), value_of(e, src)) for e in events]
    stray = ClickEvent("1000", "i1", "view", events[0].ts)
    bad = [  # (key, value, reason)
        (key_of(1000, src), stray.to_bytes(), "bad_framing"),  # plain JSON on an Avro topic
        (key_of(1000, src), b"\x00\x00\x00\x00\x63" + value_of(stray, src)[5:], "unknown_schema"),
        (key_of(1000, src), value_of(stray, src)[:5] + b"\xff\xff\xff", "undecodable"),
        (key_of(999, src), value_of(stray, src), "key_mismatch"),
        (b"1000", value_of(stray, src), "bad_key"),  # a plain string key
    ]
    for i, (k, v, _) in enumerate(bad):
        records.insert(300 * (i + 1), (k, v))
    assert produce_records(records, kafka_bootstrap, src) == len(records)

    w = WorkerProcess(kafka_bootstrap, stream_bundle_path, src, out, dlq, new_group(), tmp_path / "s",
                      tmp_path / "w.log", "--in-format", "avro", "--key", "registry", "--out-format", "avro",
                      "--registry", "mock://e2e", "--dlq-payload", "hash").start()
    reader, dead_reader = TopicReader(kafka_bootstrap, out), TopicReader(kafka_bootstrap, dlq)
    try:
        wait_for(reader, lambda m: len(m) >= len(events), 150, [w])
        wait_for(dead_reader, lambda m: len(m) >= len(bad), 30, [w])
        reader.poll(1.0)
    finally:
        assert w.stop() == 0, w.log_tail()
        reader.close()
        dead_reader.close()

    # Every vector is framed with the id the test's registry has for `<out>-value`, and
    # decodes with fastavro and that registered schema.
    registered = client.get_latest_version(f"{out}-value")
    schema = fastavro.parse_schema(json.loads(registered.schema.schema_str))
    by_user: dict[str, dict[int, list[VectorMessage]]] = defaultdict(lambda: defaultdict(list))
    for key, value in reader.messages:
        assert value[0] == 0 and struct.unpack_from(">I", value, 1)[0] == registered.schema_id
        rec = fastavro.schemaless_reader(io.BytesIO(value[5:]), schema)
        m = VectorMessage(**rec)
        assert key == m.user_id.encode()
        by_user[m.user_id][m.seq].append(m)
    stats = check_vectors(load_bundle(stream_bundle_path, providers="cpu"), events,
                          VectorLog(by_user, len(reader.messages)))
    # The typed client reads the same message with the registry, and without it.
    key, value = reader.messages[-1]
    want = VectorMessage(**fastavro.schemaless_reader(io.BytesIO(value[5:]), schema))
    for got in (decode_vector(value, key, registry=client), decode_vector(value)):
        assert (got.user_id, got.seq, got.vector.tolist()) == (want.user_id, want.seq, want.vector)

    # Bad input: dead letters with the precise reason, and only hashes and sizes (--dlq-payload hash).
    letters = read_dead_letters(dead_reader.messages)
    assert sorted(d.reason for d in letters) == sorted(r for _, _, r in bad)
    sent = {r: (k, v) for k, v, r in bad}
    for d in letters:
        k, v = sent[d.reason]
        assert d.payload == "hash" and d.key is None and d.value is None
        assert (d.value_size, d.value_sha256) == (len(v), hashlib.sha256(v).hexdigest())
        assert (d.key_size, d.key_sha256) == (len(k), hashlib.sha256(k).hexdigest())
    assert all(k == hashlib.sha256(sent[json.loads(v)["reason"]][0]).hexdigest().encode()
               for k, v in dead_reader.messages)
    print("registry e2e:", stats, "dead letters:", len(letters))
