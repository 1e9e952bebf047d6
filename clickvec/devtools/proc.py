"""Child processes and local ports, one way for `clickvec run`, the broker, the tests
and the benchmarks."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


def free_port(exclude: Sequence[int] = ()) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (not in `exclude`)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in exclude:
            return port
    raise OSError("could not find a free TCP port on 127.0.0.1")


def port_free(port: int) -> bool:
    """True when a server could listen on `port` now. SO_REUSEADDR as the JVM's (and
    most servers') listening sockets set it: connections of a server that just stopped
    linger in TIME_WAIT for up to a minute, and without it they read as "taken"."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def die_with_parent() -> None:
    """`preexec_fn` of a child: its own session (a Ctrl-C in the terminal reaches only
    the parent, which then stops its children in order) and SIGTERM when the thread
    that started it dies (Linux), so a killed parent leaves no child behind."""
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def tail(path: Path, n: int = 30) -> str:
    """The last `n` lines of a (possibly large) text file, "" when it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def clickvec_command(*args: str) -> list[str]:
    """`clickvec ARGS` run by this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-m", "clickvec.cli", *args]


class ChildProcess:
    """A command in a child process, stdout and stderr appended to a log file.

    The child leads its own session; with `die_with_parent` (Linux) it also gets
    SIGTERM when the thread that started it dies."""

    def __init__(self, cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None, die_with_parent: bool = True) -> None:
        self.cmd = list(cmd)
        self.log_path = Path(log_path)
        self.env = dict(env or {})
        self.cwd = cwd
        self.die_with_parent = die_with_parent and sys.platform.startswith("linux")
        self.proc: subprocess.Popen[bytes] | None = None
        self.terminated = False  # SIGTERM sent

    def start(self) -> ChildProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.terminated = False
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                preexec_fn=die_with_parent if self.die_with_parent else None,
                start_new_session=not self.die_with_parent,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None, "not started"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self) -> None:
        """SIGTERM without waiting (`stop` then waits), to stop several children at once."""
        if self.alive() and not self.terminated:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            self.terminated = True

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the child's clean shutdown) and wait; SIGKILL after `timeout` s.
        The exit code, or None when it had to be killed (or never started)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.returncode
        self.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.cmd[:4], timeout)
            self.proc.kill()
            self.proc.wait(10)
            return None

    def log_tail(self, n: int = 30) -> str:
        return tail(self.log_path, n) or "(no log)"
