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
from clickvec.kafka import add_kafka_arguments, kafka_client_config

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
    assert kafka_client_config(p.parse_args(["--brokers", "h:1", *flags])) == want
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
