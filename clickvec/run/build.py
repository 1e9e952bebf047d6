"""The build stage of `clickvec run`: events into the workdir, a training run, an
exported bundle; reused when the workdir holds a build of the same key."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clickvec import __version__
from clickvec.devtools.proc import clickvec_command, die_with_parent
from clickvec.run.config import HOLDOUT_FRACTION, RunConfig, RunError

log = logging.getLogger(__name__)

# A child's log line in clickvec.logsetup's text format: the message is shown on screen.
_LOG_LINE = re.compile(r"^\S+ \S+ (INFO|WARNING|ERROR|CRITICAL) \S+: (.*)$")
_SHOWN_CHARS = 140
# What a build is made of, in the workdir: events, training run, bundle, and its key.
BUILD_PARTS = ("data", "train", "model")
STATE_FILE = "build.json"


@dataclass
class Build:
    events: Path  # all events, replayed live
    train_events: Path  # the training users' events
    run_dir: Path  # training run: best.pt, metrics.json, report.md, plots
    bundle: Path  # exported model bundle
    model_id: str
    reused: bool
    seconds: float
    labels: dict[str, str]  # user -> planted anomaly kind (synthetic data only)
    training: dict[str, Any]


def train_flags(cfg: RunConfig) -> list[str]:
    # One torch thread: on a loaded 2-core machine two threads wait on each other (the demo
    # trained 1 epoch in its 2 minutes with two, 15 with one; training/README.md).
    if cfg.quick:
        return ["--epochs", "2", "--hidden", "32", "--z-dim", "16", "--item-dim", "16",
                "--max-minutes", str(min(cfg.train_minutes, 0.5)), "--num-threads", "1"]
    return ["--epochs", "20", "--hidden", "64", "--z-dim", "32", "--item-dim", "32",
            "--max-minutes", str(cfg.train_minutes), "--num-threads", "1"]


def build_key(cfg: RunConfig) -> dict[str, Any]:
    """What the built artifacts depend on; a second run with the same key reuses them."""
    if cfg.data:
        st = Path(cfg.data).stat()
        src: dict[str, Any] = {"data": str(Path(cfg.data).resolve()), "size": st.st_size,
                               "mtime_ns": st.st_mtime_ns}
    else:
        src = {"synthetic_users": cfg.users, "seed": cfg.seed}
    return {"source": src, "holdout": HOLDOUT_FRACTION, "train_flags": train_flags(cfg),
            "seed": cfg.seed, "clickvec": __version__}


def holdout(user: str) -> bool:
    return int(hashlib.sha1(user.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < HOLDOUT_FRACTION


def run_stage(name: str, cmd: list[str], logs: Path) -> None:
    """Run a stage to completion, its output into logs/NAME.log; its log messages
    (stages, epochs) also go to this process's log, so they show while it runs. The
    stage ends with this job (a stopped run leaves no training behind)."""
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"{name}.log"
    t0 = time.monotonic()
    log.info("%s: started (log %s)", name, path)
    with open(path, "wb") as f, subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=die_with_parent,
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            f.write(raw)
            f.flush()
            m = _LOG_LINE.match(raw.decode(errors="replace").rstrip())
            if m:
                msg = m.group(2)
                log.log(logging.getLevelName(m.group(1)), "%s | %s", name,
                        msg if len(msg) <= _SHOWN_CHARS else msg[: _SHOWN_CHARS - 1] + "…")
        rc = proc.wait()
    if rc != 0:
        tail = "\n".join(path.read_text(errors="replace").splitlines()[-25:])
        raise RunError(f"{name} failed (exit {rc}); log {path}\n{tail}")
    log.info("%s: done in %.1f s", name, time.monotonic() - t0)


def _labels(table: Any) -> dict[str, str]:
    if "label" not in table.schema.names:
        return {}
    import pyarrow.compute as pc

    bad = table.filter(pc.not_equal(table.column("label"), "normal"))
    return dict(zip(bad.column("user_id").to_pylist(), bad.column("label").to_pylist(), strict=True))


def training_summary(run_dir: Path) -> dict[str, Any]:
    """What the run summary and the live view say about training (metrics.json; keys a
    given trainer does not write are left out)."""
    try:
        m = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    test = m.get("test", {})
    out = {"test_model": test.get("model"), "test_markov": test.get("markov"),
           "test_popularity": test.get("popularity"), "margins": m.get("margins")}
    for k in ("stop_reason", "epochs_run", "epochs_planned", "beats_markov"):
        if k in m:
            out[k] = m[k]
    return out


def training_warnings(training: dict[str, Any]) -> list[str]:
    """Plain words for a model that is worth a second look (none when the keys are missing)."""
    out = []
    if training.get("stop_reason") == "time_cap":
        run, planned = training.get("epochs_run"), training.get("epochs_planned")
        of = f" after {run} of {planned} epochs" if run is not None and planned is not None else ""
        out.append(f"training was stopped by the time cap{of}: the model may be undertrained "
                   "(raise --train-minutes)")
    if training.get("beats_markov") is False:
        out.append("the model does not beat the Markov baseline on the test split")
    return out


def _write_events(cfg: RunConfig, events: Path, train_events: Path) -> Any:
    """Source events -> events.parquet (all) and train.parquet (users not held out)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from clickvec.eventfile import read_table, write_events

    if cfg.data:
        log.info("reading %s", cfg.data)
        table = read_table(cfg.data).sort_by([("ts", "ascending")])
    else:
        from clickvec.devtools.synth import SynthConfig, generate_table

        log.info("generating %d synthetic users (seed %d)", cfg.users, cfg.seed)
        table = generate_table(SynthConfig(n_users=cfg.users, seed=cfg.seed))
    write_events(table, events)
    keep = pa.array([not holdout(u) for u in table.column("user_id").to_pylist()])
    write_events(table.filter(keep), train_events)
    log.info("%d events, %d users -> %s (%d training events)", table.num_rows,
             len(pc.unique(table.column("user_id"))), events, int(pc.sum(keep).as_py()))
    return table


def swap_in(stage: Path, work: Path) -> None:
    """Replace the build in `work` with the complete one in `stage`. build.json leaves
    first and arrives last: a crash half-way leaves no build.json, so the next run
    rebuilds instead of reusing a mix of two builds."""
    old = work / ".build-old"
    shutil.rmtree(old, ignore_errors=True)
    old.mkdir()
    for name in (STATE_FILE, *BUILD_PARTS):
        if (work / name).exists():
            (work / name).rename(old / name)
    for name in (*BUILD_PARTS, STATE_FILE):
        (stage / name).rename(work / name)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(stage, ignore_errors=True)


def _fresh_build(cfg: RunConfig, work: Path, key: dict[str, Any]) -> Any:
    """Events, training run and bundle built in WORK/.build-next, swapped in only when
    all of them succeeded: a failed build leaves the previous good one in place."""
    stage = work / ".build-next"
    shutil.rmtree(stage, ignore_errors=True)  # left by a build that was killed
    stage.mkdir(parents=True)
    try:
        data_dir, run_dir, bundle = (stage / name for name in BUILD_PARTS)
        table = _write_events(cfg, data_dir / "events.parquet", data_dir / "train.parquet")
        run_stage("train", clickvec_command("train", "--data", str(data_dir / "train.parquet"),
                                            "--out", str(run_dir), "--no-progress", "--seed", str(cfg.seed),
                                            *train_flags(cfg)), work / "logs")
        run_stage("export", clickvec_command("export", str(run_dir), "--out", str(bundle), "--force"),
                  work / "logs")
        model_id = json.loads((bundle / "manifest.json").read_text())["model_id"]
        (stage / STATE_FILE).write_text(json.dumps({"key": key, "model_id": model_id, "built_at": time.time()},
                                                   indent=2) + "\n")
        swap_in(stage, work)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return table


def build(cfg: RunConfig, work: Path) -> Build:
    """Events, training run and bundle in `work`; reused when build.json matches."""
    from clickvec.eventfile import read_table

    t0 = time.monotonic()
    data_dir, run_dir, bundle = (work / name for name in BUILD_PARTS)
    events, train_events = data_dir / "events.parquet", data_dir / "train.parquet"
    key = build_key(cfg)
    old = None
    with contextlib.suppress(OSError, ValueError):
        old = json.loads((work / STATE_FILE).read_text())
    reuse = (old is not None and old.get("key") == key and (bundle / "manifest.json").is_file()
             and (run_dir / "metrics.json").is_file() and events.is_file())
    if reuse:
        log.info("reusing the build in %s (same config): model %s", work, old["model_id"][:12])
        table = read_table(events)
    else:
        table = _fresh_build(cfg, work, key)
    model_id = json.loads((bundle / "manifest.json").read_text())["model_id"]
    return Build(events, train_events, run_dir, bundle, model_id, reuse,
                 round(time.monotonic() - t0, 2), _labels(table), training_summary(run_dir))
