"""The real broker, `clickvec produce` and the broker CLI, end to end."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient
from kafka_util import consume_all

from clickvec.contract.events import ClickEvent, parse_event
from clickvec.devtools.produce import TokenBucket, produce_events
from clickvec.kafka import KafkaConnection, add_kafka_arguments

REPO = Path(__file__).resolve().parents[1]


def _cli(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clickvec.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env,
    )  # fmt: skip


def _assert_per_user_order(msgs: list, expected: list[ClickEvent]) -> None:
    by_user: dict[str, list[tuple[int, int, ClickEvent]]] = defaultdict(list)
    for m in msgs:
        ev = parse_event(m.value())
        assert m.key() == ev.user_id.encode()
        by_user[ev.user_id].append((m.partition(), m.offset(), ev))
    want: dict[str, list[ClickEvent]] = defaultdict(list)
    for e in expected:
        want[e.user_id].append(e)
    assert by_user.keys() == want.keys()
    for user, got in by_user.items():
        parts = {p for p, _, _ in got}
        assert len(parts) == 1, f"user {user} spread over partitions {parts}"
        got.sort(key=lambda t: t[1])
        assert [e for _, _, e in got] == want[user], f"user {user}: events out of order"


@pytest.mark.broker
def test_produce_cli_10k_events_keep_per_user_order(kafka_bootstrap: str) -> None:
    from clickvec.devtools.synth import SynthConfig, generate_events

    n = 10_000
    expected = generate_events(SynthConfig(n_users=500, seed=7))
    assert len(expected) >= n, "synthetic generator made fewer events than this test needs"
    expected = expected[:n]
    topic = f"clicks-{uuid.uuid4().hex}"  # not created: --partitions creates it
    r = _cli(
        "produce", "--brokers", kafka_bootstrap, "--topic", topic, "--synthetic",
        "--users", "500", "--seed", "7", "--limit", str(n), "--partitions", "4", "--no-progress",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["produced"] == n

    md = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(topic=topic, timeout=10)
    assert len(md.topics[topic].partitions) == 4
    msgs = consume_all(kafka_bootstrap, topic, n, timeout=60)
    assert len(msgs) == n
    assert len({m.partition() for m in msgs}) == 4
    _assert_per_user_order(msgs, expected)


@pytest.mark.broker
def test_produce_events_api_interleaved_users_and_rate(kafka_bootstrap: str, new_topic) -> None:
    topic = new_topic(partitions=3)
    # Round-robin interleaving of 50 users: the worst case for per-user ordering.
    events = [
        ClickEvent(
            f"user-{u}", f"item-{(u * 7 + k) % 97}", "click", 1_700_000_000_000 + k * 1000 + u
        )
        for k in range(10)
        for u in range(50)
    ]
    t0 = time.monotonic()
    assert produce_events(events, kafka_bootstrap, topic, rate=1000) == len(events)
    dt = time.monotonic() - t0
    assert dt >= 0.4, f"rate limit 1000/s not honoured: 500 events in {dt:.2f} s"
    msgs = consume_all(kafka_bootstrap, topic, len(events), timeout=30)
    assert len(msgs) == len(events)
    _assert_per_user_order(msgs, events)


def test_produce_to_unreachable_broker_fails_fast() -> None:
    ev = [ClickEvent("u", "i", "view", 1_700_000_000_000)]
    from clickvec.devtools.produce import ProduceError

    with pytest.raises(ProduceError):
        produce_events(
            ev, "127.0.0.1:1", "clicks", extra_config={"message.timeout.ms": 1500, "log_level": 0}
        )


@pytest.mark.broker
@pytest.mark.slow
def test_broker_cli_start_status_stop(tmp_path: Path) -> None:
    d = tmp_path / "kafka"
    r = _cli("broker", "start", "--dir", str(d))
    assert r.returncode == 0, r.stderr
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("bootstrap=")][-1]
    bootstrap = line.split("=", 1)[1]
    state = json.loads((d / "broker.json").read_text())
    pid = state["pid"]
    try:
        assert state["bootstrap"] == bootstrap
        assert AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).brokers
        s = _cli("broker", "status", "--dir", str(d))
        assert s.returncode == 0 and f"bootstrap={bootstrap}" in s.stdout
        # Starting again on a running dir reports the same broker instead of a second one.
        again = _cli("broker", "start", "--dir", str(d))
        assert again.returncode == 0 and f"bootstrap={bootstrap}" in again.stdout
    finally:
        stop = _cli("broker", "stop", "--dir", str(d))
    assert stop.returncode == 0, stop.stderr
    assert not (d / "broker.json").exists()
    assert _cli("broker", "status", "--dir", str(d)).returncode == 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)  # reaped by init once the CLI that spawned it exited
    assert (
        not Path(f"/proc/{pid}/cmdline").exists()
        or b"kafka.Kafka" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    )


@pytest.mark.broker
@pytest.mark.slow
def test_broker_cli_stop_then_start_keeps_topics_and_records(tmp_path: Path) -> None:
    """Issue #14: a restart right after `stop` (the old connections still closing on
    the broker's port) must reuse the dir's ports and data, never reformat it."""
    from confluent_kafka import Producer
    from conftest import create_topic

    d = tmp_path / "kafka"
    r = _cli("broker", "start", "--dir", str(d))
    assert r.returncode == 0, r.stderr
    bootstrap = [ln for ln in r.stdout.splitlines() if ln.startswith("bootstrap=")][-1].split("=", 1)[1]
    try:
        topic = create_topic(AdminClient({"bootstrap.servers": bootstrap}), partitions=1)
        p = Producer({"bootstrap.servers": bootstrap})
        for i in range(5):
            p.produce(topic, key=b"k", value=f"record-{i}".encode())
        assert p.flush(30) == 0
        del p  # its retries would only add noise once the broker is down
        assert len(consume_all(bootstrap, topic, 5, timeout=30)) == 5
        cluster_id = (d / "data" / "meta.properties").read_text()
    finally:
        stop = _cli("broker", "stop", "--dir", str(d))
    assert stop.returncode == 0, stop.stderr
    again = _cli("broker", "start", "--dir", str(d))
    try:
        assert again.returncode == 0, again.stderr
        assert f"bootstrap={bootstrap}" in again.stdout  # same ports
        assert (d / "data" / "meta.properties").read_text() == cluster_id  # not reformatted
        assert [m.value() for m in consume_all(bootstrap, topic, 5, timeout=30)] == [
            f"record-{i}".encode() for i in range(5)
        ]
    finally:
        assert _cli("broker", "stop", "--dir", str(d)).returncode == 0


def test_broker_start_on_a_taken_port_fails_in_one_line_and_keeps_data(tmp_path: Path) -> None:
    """A formatted dir whose port another process listens on: a clear error, never a
    reformat (no broker starts: the check comes before the JVM)."""
    import socket

    from clickvec.devtools import broker
    from clickvec.devtools.brokerconf import server_properties
    from clickvec.devtools.proc import free_port

    d = tmp_path / "kafka"
    (d / "data").mkdir(parents=True)
    (d / "data" / "meta.properties").write_text("cluster.id=keep-me\n")
    (d / "data" / "t-0").mkdir()
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        (d / "server.properties").write_text(server_properties(d, port, free_port(exclude=(port,))))
        with pytest.raises(broker.BrokerError) as e:
            broker.start(d)
    assert f"port {port}" in str(e.value) and "--reset" in str(e.value)
    assert "\n" not in str(e.value)
    assert (d / "data" / "meta.properties").read_text() == "cluster.id=keep-me\n"
    assert (d / "data" / "t-0").is_dir()


def test_token_bucket_paces() -> None:
    b = TokenBucket(rate=200, burst=1)
    t0 = time.monotonic()
    for _ in range(41):
        b.take()
    assert 0.18 <= time.monotonic() - t0 < 1.0


@pytest.mark.parametrize(
    "flags, want",
    [
        ([], {"bootstrap.servers": "h:1"}),
        (["--security-protocol", "ssl", "--ssl-cafile", "/ca.pem"],
         {"bootstrap.servers": "h:1", "security.protocol": "SSL", "ssl.ca.location": "/ca.pem"}),
        (["--sasl-mechanism", "SCRAM-SHA-512", "--sasl-username", "u", "--sasl-password", "p",
          "--security-protocol", "SASL_SSL"],
         {"bootstrap.servers": "h:1", "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
          "sasl.username": "u", "sasl.password": "p"}),
        (["--sasl-username", "u", "--sasl-password", "p"],
         {"bootstrap.servers": "h:1", "security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN",
          "sasl.username": "u", "sasl.password": "p"}),
    ],
)  # fmt: skip
def test_kafka_client_config(
    flags: list[str], want: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CLICKVEC_SASL_PASSWORD", raising=False)
    p = argparse.ArgumentParser()
    add_kafka_arguments(p)
    assert KafkaConnection.from_args(p.parse_args(["--brokers", "h:1", *flags])).client_config() == want
    if "ssl.ca.location" not in want:  # librdkafka opens the CA file at creation
        from confluent_kafka import Producer

        Producer(want)  # librdkafka accepts every key we emit


def test_kafka_wrapper_script_runs() -> None:
    r = subprocess.run(
        [str(REPO / "deploy" / "kafka" / "kafka"), "--help"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert r.returncode == 0 and "start" in r.stdout, r.stderr


def test_broker_files_come_with_the_package_and_help_answers_outside_the_repo(tmp_path: Path) -> None:
    import clickvec
    from clickvec.devtools.brokerconf import broker_file

    pkg = Path(clickvec.__file__).resolve().parent
    for name in ("pom.xml", "log4j2.properties"):
        assert broker_file(name).is_relative_to(pkg / "devtools" / "kafka"), name
    r = subprocess.run([sys.executable, "-m", "clickvec.cli", "broker", "--help"], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0 and "fetch" in r.stdout, r.stderr


def test_free_port_and_child_process(tmp_path: Path) -> None:
    from clickvec.devtools.proc import ChildProcess, free_port, port_free

    p = free_port()
    assert port_free(p) and free_port(exclude=(p,)) != p
    c = ChildProcess([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                     tmp_path / "c.log").start()
    deadline = time.monotonic() + 10
    while "up" not in c.log_tail() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.alive() and c.log_tail() == "up"
    assert c.stop(10) == -15 and not c.alive()
