"""`clickvec run` end to end on the real broker: one quick run publishes vectors, alerts
and recommendations whose counts in run_summary.json match the topics, and a second run
reuses the model the first one built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
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
    s, wall1, out = _run(work, kafka_bootstrap, duration=20)
    c = s["counts"]
    assert s["stopped_by"] == "duration"
    assert s["components"] == {"stream": "stopped", "alerts": "stopped", "recommend": "stopped",
                               "serve-redis": "stopped"}, out[-4000:]
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
    # The lookup: serve-redis kept the latest vectors in the run's redis-server, and the
    # view looked one user up per refresh.
    lk = s["lookup"]
    assert lk["available"] and lk["found"] > 10 and lk["last"]["model_id"] == model_id, lk
    assert 0 < lk["latency_ms"]["p50"] <= lk["latency_ms"]["p99"] < 5000 and lk["redis"].startswith("redis://"), lk
    assert s["serve-redis_summary"]["redis"]["written"] > 0, s.get("serve-redis_summary")
    assert "| lookup RedisLookup.get(user)" in (work / "run_summary.md").read_text()
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
                    latest_alerts=["user_id=u00012 score=4.2"], components={"stream": "running"},
                    lookup=("u00001", 4, "abc" * 10, 0.42))
    frame = render_screen(snap, width=120, color=False)
    for text in ("u00012", "card_testing", "dead letters 2", "p99   12.5ms", "alerts 1", "stream running",
                 "RedisLookup.get('u00001') → seq 4  model abcabcabcabc  0.42 ms"):
        assert text in frame, text
    assert "vectors 90" in render_line(snap) and "lookup u00001#4 0.42ms" in render_line(snap)
    off = render_screen(Snapshot(lookup_off="apt-get download redis-server failed"), width=120, color=False)
    assert "lookup off: apt-get download redis-server failed" in off


# ------------------------------------------------------------ figures and labels


def _fake_pipeline(delivered: int, vectors: int, bad: int = 0, dead: int = 0):
    from collections import deque
    from types import SimpleNamespace

    prod = SimpleNamespace(lock=threading.Lock(), delivered=delivered, delivered_bad=bad, sent=delivered + bad,
                           create_ts={})
    obs = SimpleNamespace(lock=threading.Lock(), counts={"out": vectors, "dlq": dead, "alerts": 0, "recs": 0},
                          pending=deque())
    return obs, prod


def test_latency_is_measured_from_produce_time_not_event_time() -> None:
    from clickvec.run.measure import Meter

    obs, prod = _fake_pipeline(2, 2)
    now_ms = 1_800_000_000_000
    # The events' own timestamps are a year old; they were produced 7 and 40 ms before
    # their vectors arrived.
    prod.create_ts = {(0, 10): now_ms - 7, (1, 3): now_ms - 40}
    obs.pending.extend([(0, 10, now_ms, now_ms - 2), (1, 3, now_ms, now_ms - 5)])
    m = Meter()
    m.match(obs, prod, now=100.0, wall_ms=now_ms)
    s = m.latency.summary()
    assert s["n"] == 2 and 6.5 <= s["p50"] <= 7.5 and 39 <= s["max"] <= 41  # type: ignore[operator]
    assert m.emit_latency.summary()["n"] == 2 and m.unmatched == 0
    assert not obs.pending and not prod.create_ts


def test_worker_metrics_in_the_summary_leave_out_event_time_latency() -> None:
    from clickvec.run.children import parse_metrics

    body = (b"# HELP x\nclickvec_end_to_end_seconds_sum 2.7e7\nclickvec_end_to_end_seconds_count 10\n"
            b"clickvec_events_in_total 10\nclickvec_consumer_lag{partition=\"0\"} 3\n"
            b"clickvec_consumer_lag{partition=\"1\"} 4\n")
    m = parse_metrics(body)
    assert m["lag"] == 7 and m["clickvec_events_in_total"] == 10
    from clickvec.run import summary

    kept = {k for k in m if k.startswith("clickvec_") and not k.startswith(summary.EVENT_TIME_SERIES)}
    assert kept == {"clickvec_events_in_total"}


def test_waiting_counts_events_without_a_vector() -> None:
    from clickvec.run.measure import waiting_for_vectors

    assert waiting_for_vectors(*_fake_pipeline(delivered=1700, vectors=0)) == 1700
    assert waiting_for_vectors(*_fake_pipeline(delivered=100, vectors=100, bad=3, dead=1)) == 2
    assert waiting_for_vectors(*_fake_pipeline(delivered=100, vectors=100, bad=3, dead=3)) == 0


def test_drain_is_skipped_when_nothing_waits(tmp_path: Path) -> None:
    from clickvec.run.config import parse_args
    from clickvec.run.job import Job

    job = Job(parse_args(["--workdir", str(tmp_path), "--no-dashboard"]))
    job.observer, job.producer = _fake_pipeline(delivered=500, vectors=500, bad=1, dead=1)  # type: ignore[assignment]
    t0 = time.monotonic()
    job._drain()  # noqa: SLF001
    assert time.monotonic() - t0 < 0.5 and not job.drained


def test_summary_says_recall_precision_whole_run_and_training_warnings() -> None:
    from clickvec.run.build import training_warnings
    from clickvec.run.summary import alert_quality, summary_markdown

    q = alert_quality({"u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8"}, {f"u{i}" for i in range(1, 61)})
    assert q["recall"] == round(8 / 60, 3) and q["precision"] == 1.0
    assert training_warnings({}) == []
    assert training_warnings({"stop_reason": "epochs", "beats_markov": True}) == []
    warn = training_warnings({"stop_reason": "time_cap", "epochs_run": 3, "epochs_planned": 20,
                              "beats_markov": False})
    assert len(warn) == 2 and "time cap after 3 of 20 epochs" in warn[0] and "does not beat the Markov" in warn[1]
    md = summary_markdown({"run_id": "r1", "training_warnings": warn, "alerts_vs_planted_anomalies": q,
                           "latency_ms": {"produce_to_vector_received": {"p50": 5, "p95": 9, "p99": 12, "n": 3}}})
    assert "recall 13 % (8 of 60 planted users alerted), precision 100 %" in md
    assert "| latency produce → vector received, whole run | p50 5 ms" in md
    assert "last 10 s" in md and "warning: training was stopped by the time cap" in md


def test_live_view_says_draining_and_shows_alerts_as_short_text() -> None:
    from clickvec.run.observer import alert_text, recommendation_text

    alert = json.dumps({"user_id": "u00012", "model_id": "m" * 64, "score": 4.2071, "reason": "event burst",
                        "evidence": {"surprise": 1.0, "events_last_minute": 31, "seq": 7,
                                     "parts": {"rate": 3.0, "surprise": 0.5}, "source": "clicks[0]@5"},
                        "alert_ts": 1}).encode()
    text = alert_text(alert)
    assert text == "u00012  score 4.21  event burst  event #7  31 events/min"
    rec = json.dumps({"user_id": "u1", "seq": 3, "items": [f"i{i}" for i in range(10)], "scores": [0.1] * 10})
    assert recommendation_text(rec.encode()) == "u1 #3 → i0, i1, i2, i3, i4 (+5)"
    snap = Snapshot(phase="draining", elapsed_s=66, duration_s=60, waiting=1700, latest_alerts=[text],
                    warnings=["the model does not beat the Markov baseline on the test split"])
    frame = render_screen(snap, width=150, color=False)
    assert "draining" in frame and "s left" not in frame and "waiting for vectors 1,700" in frame
    assert "warning: the model does not beat the Markov baseline" in frame and text in frame
    assert "  0 s left" in render_screen(Snapshot(elapsed_s=66, duration_s=60), width=150, color=False)
    assert "draining: " in render_line(snap) and "waiting 1,700" in render_line(snap)


def test_drain_after_ctrl_c_ends_when_the_worker_caught_up(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from clickvec.run.config import parse_args
    from clickvec.run.job import DRAIN_QUIET_S, Job

    job = Job(parse_args(["--workdir", str(tmp_path), "--no-dashboard"]))
    obs, prod = _fake_pipeline(delivered=500, vectors=450)
    job.observer, job.producer = obs, prod  # type: ignore[assignment]
    job.children["stream"] = SimpleNamespace(check=lambda: "running")  # type: ignore[assignment]
    job.snapshot = lambda phase: Snapshot(phase=phase)  # type: ignore[method-assign]
    job.request_stop("SIGINT")

    def catch_up() -> None:
        time.sleep(0.3)
        with obs.lock:
            obs.counts["out"] = 500

    threading.Thread(target=catch_up, daemon=True).start()
    t0 = time.monotonic()
    job._drain()  # noqa: SLF001
    assert job.drained and time.monotonic() - t0 < DRAIN_QUIET_S


def test_build_stage_shows_its_log_messages_while_it_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from clickvec.run.build import run_stage
    from clickvec.run.config import RunError

    script = ("from clickvec.logsetup import configure; import logging; configure();"
              "print('training config: {', flush=True);"
              "logging.getLogger('clickvec.training.train').info('epoch 1 loss 3.21')")
    with caplog.at_level("INFO", logger="clickvec.run.build"):
        run_stage("train", [sys.executable, "-c", script], tmp_path)
    shown = [r.getMessage() for r in caplog.records]
    assert "train | epoch 1 loss 3.21" in shown and not any("training config" in m for m in shown)
    assert "training config: {" in (tmp_path / "train.log").read_text()
    with pytest.raises(RunError, match=r"export failed \(exit 3\); log .*export.log\nbroken"):
        run_stage("export", [sys.executable, "-c", "import sys; print('broken'); sys.exit(3)"], tmp_path)


def test_run_goes_on_without_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture) -> None:
    """No redis-server and nothing to fetch it with: the lookup is off, said in one
    warning line, in the view and in the summary; nothing else is started."""
    from clickvec.run.lookup import LiveLookup
    from clickvec.run.summary import summary_markdown

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # neither redis-server nor apt-get
    monkeypatch.setenv("CLICKVEC_REDIS_CACHE", str(tmp_path / "cache"))
    lookup = LiveLookup(tmp_path / "work", tmp_path / "logs")
    with caplog.at_level("WARNING", logger="clickvec.run.lookup"):
        assert lookup.start([], {}, "vectors", "group") is None
    assert len(caplog.records) == 1 and "goes on without Redis" in caplog.records[0].getMessage()
    assert lookup.summary() == {"available": False, "why": lookup.unavailable} and lookup.sample("u1") is None
    assert f"lookup off: {lookup.unavailable}" in render_screen(Snapshot(lookup_off=lookup.unavailable),
                                                                width=300, color=False)
    assert "| lookup | off: redis-server is not installed" in summary_markdown({"run_id": "r",
                                                                              "lookup": lookup.summary()})
    lookup.stop()
