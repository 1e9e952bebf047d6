"""`clickvec stream` given a user's mistake: within 10 s, a non-zero exit and one line
on stderr naming the cause, no traceback, no librdkafka log."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from stream_util import REPO, free_port

TIME_BOUND_S = 10.0  # a behaviour bound for an error path (issue #14)


def _stream(tmp_path: Path, *args: str) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "clickvec.cli", "stream", "--state-dir", str(tmp_path / "s"),
           "--web-port", str(free_port()), *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    return proc.returncode, time.monotonic() - t0, proc.stderr


def _assert_one_line_error(rc: int, elapsed: float, stderr: str, *cause: str) -> str:
    lines = stderr.strip().splitlines()
    assert rc != 0, stderr
    assert "Traceback" not in stderr, stderr
    assert elapsed < TIME_BOUND_S, f"took {elapsed:.1f}s:\n{stderr}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{stderr}"
    last = lines[-1]
    for words in cause:
        assert words.lower() in last.lower(), f"{words!r} not in the last line {last!r}"
    return last


def test_bad_model_path_is_named_before_any_connection(tmp_path):
    # An unreachable broker: a connection attempt would take seconds and name the broker.
    rc, elapsed, err = _stream(tmp_path, "--model", str(tmp_path / "no-such-bundle"),
                               "--brokers", f"127.0.0.1:{free_port()}")
    _assert_one_line_error(rc, elapsed, err, "no-such-bundle", "not a model bundle")
    assert elapsed < 5.0, f"the model path was checked after a connection attempt ({elapsed:.1f}s)"


def test_no_broker_reachable(tmp_path, stream_bundle_path):
    port = free_port()
    rc, elapsed, err = _stream(tmp_path, "--model", str(stream_bundle_path), "--brokers", f"127.0.0.1:{port}")
    _assert_one_line_error(rc, elapsed, err, f"127.0.0.1:{port}", "connection refused")


def test_missing_ca_file(tmp_path, stream_bundle_path):
    rc, elapsed, err = _stream(tmp_path, "--model", str(stream_bundle_path), "--brokers", "127.0.0.1:9093",
                               "--ssl-cafile", str(tmp_path / "missing-ca.pem"))
    _assert_one_line_error(rc, elapsed, err, "missing-ca.pem", "does not exist")


@pytest.mark.broker
def test_tls_to_a_plaintext_listener(tmp_path, stream_bundle_path, kafka_bootstrap):
    rc, elapsed, err = _stream(tmp_path, "--model", str(stream_bundle_path), "--brokers", kafka_bootstrap,
                               "--security-protocol", "SSL")
    _assert_one_line_error(rc, elapsed, err, kafka_bootstrap, "SSL")


@pytest.mark.broker
def test_missing_input_topic(tmp_path, stream_bundle_path, kafka_bootstrap):
    topic = f"absent-{uuid.uuid4().hex}"
    rc, elapsed, err = _stream(tmp_path, "--model", str(stream_bundle_path), "--brokers", kafka_bootstrap,
                               "--in", topic)
    _assert_one_line_error(rc, elapsed, err, topic, "does not exist")


@pytest.fixture(scope="module")
def sasl_bootstrap(tmp_path_factory):
    """A second broker with a SASL_PLAINTEXT (PLAIN) listener: user alice, password
    alice-secret."""
    from clickvec.devtools import broker

    port, sasl_port, controller = free_port(), free_port(), free_port()
    jaas = ('org.apache.kafka.common.security.plain.PlainLoginModule required username="admin" '
            'password="admin-secret" user_admin="admin-secret" user_alice="alice-secret";')
    listeners = (f"PLAINTEXT://127.0.0.1:{port},SASL_PLAINTEXT://127.0.0.1:{sasl_port},"
                 f"CONTROLLER://127.0.0.1:{controller}")
    b = broker.start(tmp_path_factory.mktemp("sasl-broker"), port=port, controller_port=controller,
                     extra_properties={
                         "listeners": listeners, "advertised.listeners": listeners,
                         "listener.security.protocol.map":
                             "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
                         "sasl.enabled.mechanisms": "PLAIN",
                         "listener.name.sasl_plaintext.plain.sasl.jaas.config": jaas,
                     })
    try:
        yield f"127.0.0.1:{sasl_port}"
    finally:
        b.stop()


@pytest.mark.broker
@pytest.mark.slow
def test_wrong_sasl_password(tmp_path, stream_bundle_path, sasl_bootstrap):
    rc, elapsed, err = _stream(tmp_path, "--model", str(stream_bundle_path), "--brokers", sasl_bootstrap,
                               "--sasl-username", "alice", "--sasl-password", "wrong")
    _assert_one_line_error(rc, elapsed, err, "authentication")
    # The right password gets past the check: the error is then the missing topic.
    rc, elapsed, err = _stream(tmp_path, "--model", str(stream_bundle_path), "--brokers", sasl_bootstrap,
                               "--sasl-username", "alice", "--sasl-password", "alice-secret",
                               "--in", "absent-topic")
    _assert_one_line_error(rc, elapsed, err, "absent-topic", "does not exist")


@pytest.mark.broker
@pytest.mark.slow
def test_wrong_sasl_password_other_commands(tmp_path, stream_bundle_path, sasl_bootstrap):
    """produce, alerts, recommend and run share the check (clickvec/preflight.py): the same
    one line. Run at once: each mostly waits on the broker's answer."""
    from concurrent.futures import ThreadPoolExecutor

    creds = ["--brokers", sasl_bootstrap, "--sasl-username", "alice", "--sasl-password", "wrong"]
    commands = {
        "produce": ["produce", *creds, "--synthetic", "--no-progress"],
        "alerts": ["alerts", *creds],
        "recommend": ["recommend", *creds, "--model", str(stream_bundle_path)],
        "run": ["run", *creds, "--workdir", str(tmp_path / "w")],
    }

    def run(args: list[str]) -> tuple[int, float, str]:
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "clickvec.cli", *args], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
        return p.returncode, time.monotonic() - t0, p.stderr

    with ThreadPoolExecutor(len(commands)) as pool:
        results = dict(zip(commands, pool.map(run, commands.values()), strict=True))
    for name, (rc, elapsed, err) in results.items():
        line = _assert_one_line_error(rc, elapsed, err, "authentication")
        assert line.startswith(f"clickvec {name}:"), line
