"""`clickvec run` end to end on the real broker: one quick run publishes vectors, alerts
and recommendations whose counts in run_summary.json match the topics, and a second run
reuses the model the first one built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from kafka_util import consume_all

from clickvec.contract.messages import VectorMessage
from clickvec.run.view import LatencyHistogram, Snapshot, render_line, render_screen, sparkline

REPO = Path(__file__).resolve().parents[1]


def _run(work: Path, bootstrap: str, duration: float, timeout: float = 240) -> tuple[dict, float, str]:
    cmd = [sys.executable, "-m", "clickvec.cli", "run", "--quick", "--no-dashboard", "--workdir", str(work),
           "--brokers", bootstrap, "--duration", str(duration), "--rate", "1000", "--malformed-every", "500"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.monotonic() - t0
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"clickvec run exited {p.returncode}:\n{out[-6000:]}"
    return json.loads((work / "run_summary.json").read_text()), wall, out


def _topic_size(bootstrap: str, topic: str) -> int:
    """Messages in `topic` by its watermarks (idempotent, non-transactional producers:
    one offset per message), so extra messages cannot hide behind a bounded read."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "size-probe"})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        total = 0
        for p in parts:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += hi - lo
        return total
    finally:
        c.close()


@pytest.mark.broker
@pytest.mark.slow
def test_run_publishes_and_counts_agree_then_reuses_the_model(kafka_bootstrap: str, tmp_path: Path) -> None:
    work = tmp_path / "run"
    s, wall1, out = _run(work, kafka_bootstrap, duration=30)
    c = s["counts"]
    assert s["stopped_by"] == "duration"
    assert s["components"] == {"stream": "stopped", "alerts": "stopped", "recommend": "stopped"}, out[-4000:]
    assert c["events_produced"] > 5000 and c["produce_failures"] == 0
    assert c["vectors_published"] == c["events_produced"]  # one vector per valid event
    assert c["malformed_produced"] > 0 and c["dead_letters"] == c["malformed_produced"]
    assert c["alerts"] > 0 and c["recommendations"] > 0
    lat = s["latency_ms"]["produce_to_vector_received"]
    assert lat["n"] == c["vectors_published"] and lat["p50"] <= lat["p99"]

    # The summary's counts are the topics' contents.
    t = s["topics"]
    expected = {"in": c["messages_produced"], "out": c["vectors_published"], "dlq": c["dead_letters"],
                "alerts": c["alerts"], "recs": c["recommendations"]}
    for kind, n in expected.items():
        assert _topic_size(kafka_bootstrap, t[kind]) == n, kind
    vectors = consume_all(kafka_bootstrap, t["out"], expected["out"])
    assert len(vectors) == expected["out"]
    model_id = s["model"]["model_id"]
    assert {VectorMessage.from_bytes(m.value()).model_id for m in vectors[:2000]} == {model_id}
    assert s["vector_model_ids"] == [model_id]
    for kind in ("dlq", "alerts", "recs"):
        assert len(consume_all(kafka_bootstrap, t[kind], expected[kind], timeout=30)) == expected[kind], kind

    # What the run leaves behind.
    for p in ("bundle", "training_report"):
        assert Path(s["model"][p]).exists(), p
    assert (work / "run_summary.md").read_text().startswith(f"# clickvec run {s['run_id']}")
    assert not s["build"]["reused"]

    # A second run reuses the build: same model, fresh topics, faster.
    s2, wall2, out2 = _run(work, kafka_bootstrap, duration=8)
    assert s2["build"]["reused"], out2[-3000:]
    assert s2["model"]["model_id"] == model_id
    assert s2["build"]["seconds"] < s["build"]["seconds"]
    assert wall2 < wall1
    assert s2["topics"]["out"] != t["out"]
    assert s2["counts"]["vectors_published"] == s2["counts"]["events_produced"] > 0
    assert _topic_size(kafka_bootstrap, s2["topics"]["out"]) == s2["counts"]["vectors_published"]


def test_dashboard_renders_a_frame_and_a_line() -> None:
    h = LatencyHistogram()
    for ms in range(1, 101):
        h.add(float(ms))
    assert 48 <= h.percentile(50) <= 52 and 97 <= h.percentile(99) <= 101  # type: ignore[operator]
    assert sparkline([-1.0, 0.0, 1.0]) == "▁▅█"
    snap = Snapshot(elapsed_s=12, brokers="127.0.0.1:9092", model_id="abc" * 10, produced=100, vectors=90,
                    dead_letters={"not_json": 2}, latency_now=[3.0, 9.0, 12.5],
                    top_surprise=[("u00012", 7.5, 31, "card_testing")],
                    watched=[("u00001", 4, [0.1, -0.2, 0.3], 1.5)], alerts=1,
                    latest_alerts=["user_id=u00012 score=4.2"], components={"stream": "running"})
    frame = render_screen(snap, width=120, color=False)
    for text in ("u00012", "card_testing", "dead letters 2", "p99   12.5ms", "alerts 1", "stream running"):
        assert text in frame, text
    assert "vectors 90" in render_line(snap)
