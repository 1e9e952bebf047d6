"""`clickvec run` builds into a fresh directory and swaps it in only on success: a
failed build (or a failed run) leaves the workdir's good build and summary as they were
(issue #14). The "good build" is fabricated: the swap does not depend on training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from clickvec.run.build import BUILD_PARTS, STATE_FILE, swap_in

REPO = Path(__file__).resolve().parents[1]


def _fake_build(work: Path, tag: str) -> dict[str, bytes]:
    files = {
        "data/events.parquet": f"{tag} events".encode(),
        "data/train.parquet": f"{tag} train events".encode(),
        "train/metrics.json": b'{"test": {}}',
        "train/best.pt": f"{tag} weights".encode(),
        "model/manifest.json": json.dumps({"model_id": tag}).encode(),
        STATE_FILE: json.dumps({"key": {"old": True}, "model_id": tag}).encode(),
    }
    for rel, data in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(data)
    return files


def _snapshot(work: Path) -> dict[str, bytes]:
    return {str(p.relative_to(work)): p.read_bytes() for p in sorted(work.rglob("*"))
            if p.is_file() and p.parts[len(work.parts)] != "logs"}


def test_swap_in_replaces_every_part_and_leaves_nothing_behind(tmp_path: Path) -> None:
    work, stage = tmp_path / "work", tmp_path / "work" / ".build-next"
    _fake_build(work, "old")
    (work / "model" / "stale.onnx").write_bytes(b"only in the old build")
    new = _fake_build(stage, "new")
    swap_in(stage, work)
    assert _snapshot(work) == new  # the old build's extra file went with it
    assert sorted(p.name for p in work.iterdir()) == sorted([*BUILD_PARTS, STATE_FILE])


def test_failed_run_keeps_the_good_build_and_summary(tmp_path: Path, kafka_bootstrap: str) -> None:
    work = tmp_path / "run"
    _fake_build(work, "good")
    (work / "run_summary.json").write_text('{"run_id": "good"}\n')
    (work / "run_summary.md").write_text("# clickvec run good\n")
    before = _snapshot(work)
    bad = tmp_path / "events.csv"
    bad.write_text("this,is\nnot,an event file\n")
    # --brokers: no local broker to start (the start-up check needs a reachable one); the
    # build then fails on the data.
    p = subprocess.run(
        [sys.executable, "-m", "clickvec.cli", "run", "--quick", "--no-dashboard", "--workdir", str(work),
         "--brokers", kafka_bootstrap, "--data", str(bad), "--duration", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert p.returncode == 1, p.stdout + p.stderr
    after = _snapshot(work)
    failed = {k: after.pop(k) for k in list(after) if k.startswith("run_summary.failed.")}
    assert after == before
    assert b"error" in failed.get("run_summary.failed.json", b""), sorted(failed)
    assert not (work / ".build-next").exists()
