"""Every Kafka command other than `stream` (tests/test_stream_errors.py) given a user's
mistake: within 10 s, a non-zero exit and one line on stderr naming the cause, no
traceback, no librdkafka log; a model bundle is checked before any connection.

The commands are independent processes that mostly wait (for a connection that never
comes), so all the cases run at once in one module fixture; each case is then its own
parametrised test. A wrong SASL password is in tests/test_stream_errors.py, next to the
SASL broker it needs.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from stream_util import REPO, free_port
from test_stream_errors import TIME_BOUND_S, _assert_one_line_error

ABSENT = f"absent-{uuid.uuid4().hex[:12]}"


def _cases(bootstrap: str, bundle: Path, tmp: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """case id -> (clickvec arguments, words the error line must contain)."""
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    cases: dict[str, tuple[list[str], tuple[str, ...]]] = {}
    for cmd, extra in (("produce", ["--synthetic", "--users", "5", "--no-progress"]),
                       ("alerts", ["--in", "user-vectors"]),
                       ("recommend", ["--model", str(bundle), "--in", "user-vectors"])):
        cases[f"{cmd}-no-broker"] = ([cmd, "--brokers", down, *extra], (down, "connection refused"))
        cases[f"{cmd}-tls-to-plaintext"] = ([cmd, "--brokers", bootstrap, "--security-protocol", "SSL", *extra],
                                            (bootstrap, "SSL"))
        cases[f"{cmd}-missing-ca-file"] = ([cmd, "--brokers", bootstrap, "--ssl-cafile", str(tmp / "ca.pem"), *extra],
                                           ("ca.pem", "does not exist"))
    cases["produce-missing-topic"] = (["produce", "--brokers", bootstrap, "--topic", ABSENT, "--synthetic",
                                       "--no-progress"], (ABSENT, "does not exist", "--partitions"))
    cases["produce-missing-file"] = (["produce", "--brokers", down, "--file", str(tmp / "ev.parquet")],
                                     ("ev.parquet", "does not exist"))
    for cmd, extra in (("alerts", []), ("recommend", ["--model", str(bundle)])):
        cases[f"{cmd}-missing-topic"] = ([cmd, "--brokers", bootstrap, "--in", ABSENT, *extra],
                                         (ABSENT, "does not exist"))
    # The bundle comes before any connection: with an unreachable broker, still its line.
    cases["recommend-bad-model-path"] = (["recommend", "--brokers", down, "--model", str(tmp / "no-bundle")],
                                         ("no-bundle", "not a model bundle"))
    cases["run-no-broker"] = (["run", "--brokers", down, "--workdir", str(tmp / "w")], (down, "connection refused"))
    cases["run-missing-data"] = (["run", "--data", str(tmp / "ev.parquet"), "--workdir", str(tmp / "w")],
                                 ("ev.parquet", "does not exist"))
    return cases


def _run(args: list[str]) -> tuple[int, float, str]:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "clickvec.cli", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    return p.returncode, time.monotonic() - t0, p.stderr


CASE_IDS = list(_cases("B", Path("m"), Path("t")))


@pytest.fixture(scope="module")
def outcomes(kafka_bootstrap: str, stream_bundle_path: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("cli-errors")
    cases = _cases(kafka_bootstrap, stream_bundle_path, tmp)
    # Six at a time: most wait on a connection; more would make the 2-core machine the cause.
    with ThreadPoolExecutor(6) as pool:
        futures = {k: pool.submit(_run, args) for k, (args, _) in cases.items()}
        done = {k: (f.result(), cases[k][1]) for k, f in futures.items()}
    assert not (tmp / "w").exists(), "clickvec run touched its workdir before its checks passed"
    return done


@pytest.mark.broker
@pytest.mark.parametrize("case", CASE_IDS)
def test_user_mistake_is_one_line_within_seconds(outcomes, case: str) -> None:
    (rc, elapsed, err), words = outcomes[case]
    assert elapsed < TIME_BOUND_S
    _assert_one_line_error(rc, elapsed, err, *words)
    assert rc == 2, (rc, err)
    if case == "recommend-bad-model-path":
        assert elapsed < 5.0, f"the model path was checked after a connection attempt ({elapsed:.1f}s)"


@pytest.mark.broker
def test_consumer_creates_its_missing_output_topic(kafka_bootstrap: str, new_topic, new_group) -> None:
    """The input topic must exist, the output topic is created with its partition count."""
    from confluent_kafka.admin import AdminClient

    vec, out = new_topic(3, "vec"), f"alerts-{uuid.uuid4().hex}"
    rc, _, err = _run(["alerts", "--brokers", kafka_bootstrap, "--in", vec, "--out", out, "--group", new_group(),
                       "--idle-exit", "1"])
    assert rc == 0, err
    md = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(topic=out, timeout=10)
    assert len(md.topics[out].partitions) == 3
