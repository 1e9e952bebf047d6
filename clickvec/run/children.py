"""The pipeline's child processes (`clickvec stream`, `alerts`, `recommend`) and the
waits that keep their start-up out of the figures."""

from __future__ import annotations

import contextlib
import logging
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from clickvec.devtools.proc import ChildProcess, clickvec_command
from clickvec.run.config import RunError

log = logging.getLogger(__name__)


class Component(ChildProcess):
    """A `clickvec` subcommand of the pipeline, with a status for the view and summary."""

    def __init__(self, name: str, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(clickvec_command(*args), log_path, env)
        self.name = name
        self.status = "not started"

    def start(self) -> Component:
        super().start()
        self.status = "running"
        return self

    def check(self) -> str:
        if self.proc is not None and self.status == "running" and self.proc.poll() is not None:
            self.status = f"exited ({self.proc.returncode})"
            log.warning("%s exited with %d; log %s\n%s", self.name, self.proc.returncode,
                        self.log_path, self.log_tail(15))
        return self.status

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is not None and not self.terminated:
            self.check()  # it ended on its own
            return self.proc.returncode
        rc = super().stop(timeout)
        code = self.proc.returncode  # -9 when it had to be killed
        if self.status == "running":
            self.status = "stopped" if code in (0, -signal.SIGTERM) else f"stopped (exit {code})"
        return rc


def stop_all(children: list[Component], timeout: float = 30.0) -> None:
    """SIGTERM to all at once, then wait for each."""
    for c in children:
        c.terminate()
    for c in children:
        c.stop(timeout)


def http_get(url: str, timeout: float = 0.5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def wait_worker_ready(worker: Component, port: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not worker.alive():
            raise RunError(f"the stream worker exited ({worker.check()}); log {worker.log_path}\n"
                           + worker.log_tail())
        with contextlib.suppress(OSError):
            if http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200:
                return
        time.sleep(0.5)
    raise RunError(f"the stream worker was not ready within {timeout:.0f} s; log {worker.log_path}\n"
                   + worker.log_tail())


def wait_group_members(admin_conf: dict[str, Any], groups: list[str], children: list[Component],
                       timeout: float = 30.0) -> None:
    """Until every consumer group has a member with partitions (they read from the
    earliest offset anyway: this only keeps start-up latency out of the figures)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(admin_conf)
    pending = dict(zip(groups, children, strict=True))
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for g, child in list(pending.items()):
            if not child.alive():
                pending.pop(g)
                continue
            try:
                desc = admin.describe_consumer_groups([g], request_timeout=5)[g].result(5)
                if any(m.assignment and m.assignment.topic_partitions for m in desc.members):
                    pending.pop(g)
            except Exception:  # noqa: BLE001 - the group does not exist yet
                pass
        time.sleep(0.3)
    if pending:
        log.warning("consumer groups %s not assigned after %.0f s; going on", list(pending), timeout)


def parse_metrics(body: bytes) -> dict[str, float]:
    """Prometheus text -> {name: value} for unlabelled series; `lag` sums the
    worker's per-partition consumer lag."""
    m: dict[str, float] = {}
    lag = 0.0
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            continue
        if name.startswith("clickvec_consumer_lag{"):
            lag += v
        elif "{" not in name:
            m[name] = v
    m["lag"] = lag
    return m


def scrape_metrics(port: int) -> dict[str, float] | None:
    """The stream worker's /metrics, or None when it does not answer."""
    try:
        status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    except OSError:
        return None
    return parse_metrics(body) if status == 200 else None
