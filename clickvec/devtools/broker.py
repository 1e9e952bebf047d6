"""A real Apache Kafka broker (KRaft, combined broker + controller) on 127.0.0.1.

The broker runs as `java ... kafka.Kafka server.properties`, exactly as the release
tarball's scripts would start it, from jars fetched once (brokerconf.py). Used by the
test suite, by `clickvec run` and by people: `clickvec broker start|stop|status|fetch`.

Layout of a broker dir: `server.properties`, `data/` (log.dirs), `logs/server.log`
(log4j file appender), `logs/console.out` (stdout/stderr of the JVM), `broker.json`
(state written by the CLI so another process can stop it).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clickvec.devtools.brokerconf import (
    DEFAULT_DIR,
    KAFKA_VERSION,
    STATE_FILE,
    BrokerError,
    fetch_jars,
    format_storage,
    java_command,
    read_ports,
    read_state_file,
    server_properties,
    state_dict,
    write_state_file,
)
from clickvec.devtools.proc import ChildProcess, free_port, port_free, tail

if TYPE_CHECKING:
    from clickvec.devtools.cluster import Cluster

__all__ = ["KAFKA_VERSION", "Broker", "BrokerError", "fetch_jars", "read_state", "start", "start_cluster",
           "write_state"]

log = logging.getLogger(__name__)


@dataclass
class Broker:
    """A running broker started by `start` (or found through a state file)."""

    data_dir: Path
    port: int
    controller_port: int
    pid: int
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def log_path(self) -> Path:
        return self.log_dir / "server.log"

    @property
    def console_path(self) -> Path:
        return self.log_dir / "console.out"

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _pid_is_our_broker(self.pid, self.data_dir)

    def log_tail(self, n: int = 60) -> str:
        """Last `n` lines of the broker log; the JVM's console (which also holds
        errors from before logging started) when the file log is empty."""
        text = tail(self.log_path, n)
        if not text or not self.alive():
            console = tail(self.console_path, n)
            if console and console not in text:
                text = (text + "\n" if text else "") + console
        return text

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (controlled shutdown), wait, then SIGKILL."""
        if not self.alive():
            if self.process is not None:
                self.process.wait()
            return
        _signal(self.pid, signal.SIGTERM)
        if not _wait_gone(self, timeout):
            log.warning("broker pid %d did not stop in %.0f s; killing it", self.pid, timeout)
            _signal(self.pid, signal.SIGKILL)
            _wait_gone(self, 10.0)

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal(pid: int, sig: int) -> None:
    # The broker leads its own session: signal the group, it holds only the JVM.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _wait_gone(b: Broker, timeout: float) -> bool:
    if b.process is not None:
        try:
            b.process.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_is_our_broker(b.pid, b.data_dir):
            return True
        time.sleep(0.1)
    return False


def _pid_is_our_broker(pid: int, data_dir: Path) -> bool:
    """True when `pid` is a live kafka.Kafka JVM started on `data_dir` (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True  # no /proc (not Linux): trust the pid
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    want = str((data_dir / "server.properties").resolve()).encode()
    return b"kafka.Kafka" in cmdline and want in cmdline


def _wait_ready(b: Broker, timeout: float) -> None:
    from confluent_kafka.admin import AdminClient

    # log_level 2: no "connection refused" lines while the JVM is still starting.
    admin = AdminClient(
        {
            "bootstrap.servers": b.bootstrap,
            "socket.connection.setup.timeout.ms": 2000,
            "log_level": 2,
        }
    )
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not b.alive():
            code = b.process.returncode if b.process is not None else "?"
            raise BrokerError(
                f"Kafka broker exited during start-up (exit {code})", b.log_tail(), b.log_path
            )
        try:
            with socket.create_connection(("127.0.0.1", b.port), timeout=1):
                pass
        except OSError as e:
            last = str(e)
            time.sleep(0.1)
            continue
        try:
            md = admin.list_topics(timeout=2)
            if md.brokers:
                return
        except Exception as e:  # KafkaException while the listener is not up yet
            last = str(e)
        time.sleep(0.2)
    b.stop(timeout=10)
    raise BrokerError(
        f"Kafka broker at {b.bootstrap} did not answer within {timeout:.0f} s ({last})",
        b.log_tail(),
        b.log_path,
    )


def _prepare_dir(data_dir: Path, port: int, controller_port: int,
                 extra_properties: dict[str, str] | None, reset: bool) -> tuple[int, int, bool]:
    """Ports for the broker in `data_dir` and whether its storage is already formatted.

    A formatted dir keeps its data, cluster id and ports: only `reset` deletes them.
    When its ports cannot be used, fail in one line rather than reformat."""
    props_path = data_dir / "server.properties"
    data = data_dir / "data"
    if reset:
        log.warning("--reset: deleting the broker data in %s", data)
        shutil.rmtree(data, ignore_errors=True)
    if (data / "meta.properties").is_file():
        port, controller_port = _reuse_ports(data_dir, port, controller_port)
        if extra_properties:  # settings may change between starts; storage stays
            props_path.write_text(server_properties(data_dir, port, controller_port, extra_properties))
        log.info("reusing formatted broker dir %s", data_dir)
        return port, controller_port, True
    if data.is_dir() and any(data.iterdir()):
        raise BrokerError(f"{data} holds files but no meta.properties; move it away, or start "
                          "with --reset to delete it")
    try:
        port = port or free_port()
        controller_port = controller_port or free_port(exclude=(port,))
    except OSError as e:
        raise BrokerError(str(e)) from e
    props_path.write_text(server_properties(data_dir, port, controller_port, extra_properties))
    return port, controller_port, False


def _reuse_ports(data_dir: Path, port: int, controller_port: int) -> tuple[int, int]:
    """The ports a formatted dir was started with: its controller's address is part of
    its metadata (a standalone KRaft voter), so a new port would need a new format."""
    old = read_ports(data_dir / "server.properties")
    hint = "or start with --reset to delete this broker's data"
    if old is None:
        raise BrokerError(f"{data_dir / 'server.properties'} names no listener ports; restore it, {hint}")
    if port not in (0, old[0]) or controller_port not in (0, old[1]):
        raise BrokerError(f"broker dir {data_dir} uses ports {old[0]}/{old[1]}, not "
                          f"{port or old[0]}/{controller_port or old[1]}; drop --port, {hint}")
    for p in old:
        if not port_free(p):
            raise BrokerError(f"port {p} of the broker in {data_dir} is in use by another process; "
                              f"stop that process, {hint}")
    return old


def start(
    data_dir: str | Path,
    port: int = 0,
    controller_port: int = 0,
    timeout: float = 60.0,
    heap: str = "512m",
    extra_properties: dict[str, str] | None = None,
    die_with_parent: bool = True,
    foreground: bool = False,
    reset: bool = False,
) -> Broker:
    """Start a single-node KRaft broker whose files live in `data_dir`; return once a
    client can list topics. `port=0` picks free ports. A dir formatted by an earlier
    start is reused with its ports, cluster id and data; a BrokerError says so when
    that cannot be done. Only `reset=True` deletes its data (and then picks new ports).

    `die_with_parent` (Linux) SIGTERMs the broker when the *thread* that called `start`
    exits, so a killed test run leaves no JVM behind; call it from a long-lived thread,
    or pass False (the CLI does) for a broker that outlives its starter."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    libs = fetch_jars()
    port, controller_port, reused = _prepare_dir(data_dir, port, controller_port, extra_properties, reset)
    props_path = data_dir / "server.properties"
    log_dir = data_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    java = shutil.which("java")
    if java is None:
        raise BrokerError("`java` (17+) is not on PATH; the Kafka broker needs it")
    classpath = f"{libs}/*"
    if not reused:
        format_storage(java, classpath, props_path)
    cmd = java_command(java, heap, log_dir, classpath, props_path)
    proc = _spawn(cmd, data_dir, log_dir, die_with_parent and not foreground, foreground)
    b = Broker(data_dir, port, controller_port, proc.pid, proc)
    t0 = time.monotonic()
    _wait_ready(b, timeout)
    log.info("Kafka %s up at %s in %.1f s (pid %d, log %s)", KAFKA_VERSION, b.bootstrap,
             time.monotonic() - t0, b.pid, b.log_path)
    return b


def start_cluster(data_dir: str | Path, nodes: int = 3, **kwargs: Any) -> Cluster:
    """A cluster of `nodes` KRaft nodes on loopback (cluster.py); `kwargs` as
    `cluster.start_cluster` takes them."""
    from clickvec.devtools.cluster import start_cluster as _start_cluster

    return _start_cluster(data_dir, nodes, **kwargs)


def _spawn(cmd: list[str], data_dir: Path, log_dir: Path, tie: bool, foreground: bool) -> subprocess.Popen[bytes]:
    if foreground:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, cwd=data_dir)
    child = ChildProcess(cmd, log_dir / "console.out", cwd=data_dir, die_with_parent=tie).start()
    assert child.proc is not None
    return child.proc


# ------------------------------------------------------------------- state file (CLI)


def write_state(b: Broker) -> Path:
    return write_state_file(b.data_dir, state_dict(b.pid, b.port, b.controller_port, b.data_dir, b.log_path))


def read_state(data_dir: str | Path) -> Broker | None:
    """The broker recorded in `data_dir`'s state file, or None when there is none."""
    data_dir = Path(data_dir).resolve()
    st = read_state_file(data_dir)
    return None if st is None else Broker(data_dir, st[0], st[1], st[2])


# ------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clickvec broker", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    ps = sub.add_parser("start", help="start a broker and print bootstrap=HOST:PORT")
    ps.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="broker dir (default: %(default)s)")
    ps.add_argument("--port", type=int, default=0, help="client port (default: a free one)")
    ps.add_argument("--controller-port", type=int, default=0)
    ps.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the broker")
    ps.add_argument("--heap", default="512m")
    ps.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops the broker")
    ps.add_argument("--reset", action="store_true",
                    help="delete the broker's data (topics, records) and format it afresh")
    ps.add_argument("--nodes", type=int, default=1,
                    help="start a cluster of this many nodes in --dir/node-N (default: %(default)s, one broker)")
    for name, help_ in (("stop", "stop the broker recorded in --dir"), ("status", "is it running?")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    sub.add_parser("fetch", help="only download the broker jars into the cache")
    return p


def _cluster_nodes(data_dir: Path) -> list[Broker] | None:
    """The nodes recorded in a cluster dir (`start --nodes N`), or None for a broker dir."""
    from clickvec.devtools.cluster import read_cluster_nodes

    dirs = read_cluster_nodes(Path(data_dir).resolve())
    return None if dirs is None else [b for b in map(read_state, dirs) if b is not None]


def _status(args: argparse.Namespace) -> int:
    nodes = _cluster_nodes(args.dir)
    if nodes is not None:
        live = [b for b in nodes if b.alive()]
        print(f"bootstrap={','.join(b.bootstrap for b in nodes)}\nnodes={len(nodes)}\nrunning={len(live)}")
        return 0 if live else 1
    b = read_state(args.dir)
    if b is None or not b.alive():
        print(f"stopped (no running broker recorded in {args.dir})")
        return 1
    print(f"bootstrap={b.bootstrap}\npid={b.pid}\nlog={b.log_path}\nrunning")
    return 0


def _stop(args: argparse.Namespace) -> int:
    nodes = _cluster_nodes(args.dir)
    if nodes is not None:
        from clickvec.devtools.cluster import CLUSTER_FILE, Cluster

        Cluster(Path(args.dir).resolve(), nodes).stop()
        for node in nodes:
            (node.data_dir / STATE_FILE).unlink(missing_ok=True)
        (Path(args.dir) / CLUSTER_FILE).unlink(missing_ok=True)
        print(f"stopped {len(nodes)} nodes")
        return 0
    b = read_state(args.dir)
    if b is None:
        print(f"no broker recorded in {args.dir}")
        return 0
    b.stop()
    (b.data_dir / STATE_FILE).unlink(missing_ok=True)
    print(f"stopped pid={b.pid}")
    return 0


def _start_cluster(args: argparse.Namespace) -> int:
    from clickvec.devtools.cluster import start_cluster as _start_nodes
    from clickvec.devtools.cluster import write_cluster_state

    nodes = _cluster_nodes(args.dir)
    if nodes and any(b.alive() for b in nodes):
        print(f"bootstrap={','.join(b.bootstrap for b in nodes)}")
        log.info("cluster already running")
        return 0
    if args.foreground or args.port or args.controller_port:
        raise BrokerError("--nodes N takes neither --foreground nor --port/--controller-port")
    c = _start_nodes(args.dir, args.nodes, timeout=max(args.timeout, 90.0), heap=args.heap,
                     die_with_parent=False, reset=args.reset)
    for b in c.nodes:
        write_state(b)
    write_cluster_state(c)
    print(f"bootstrap={c.bootstrap}", flush=True)
    return 0


def _start(args: argparse.Namespace) -> int:
    if args.nodes > 1:
        if (args.dir / "data" / "meta.properties").is_file():
            raise BrokerError(f"{args.dir} holds a single broker; start it without --nodes, or use another --dir")
        return _start_cluster(args)
    if (args.dir / "node-1" / "server.properties").is_file():
        raise BrokerError(f"{args.dir} holds a cluster; start it with --nodes N, or use another --dir")
    old = read_state(args.dir)
    if old is not None and old.alive():
        print(f"bootstrap={old.bootstrap}")
        log.info("broker already running (pid %d)", old.pid)
        return 0
    b = start(args.dir, port=args.port, controller_port=args.controller_port, timeout=args.timeout,
              heap=args.heap, die_with_parent=False, foreground=args.foreground, reset=args.reset)
    write_state(b)
    print(f"bootstrap={b.bootstrap}", flush=True)
    if not args.foreground:
        return 0
    try:
        assert b.process is not None
        return b.process.wait()
    except KeyboardInterrupt:
        b.stop()
        return 0
    finally:
        (b.data_dir / STATE_FILE).unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.action == "fetch":
            print(f"libs={fetch_jars()}")
            return 0
        return {"status": _status, "stop": _stop, "start": _start}[args.action](args)
    except BrokerError as e:
        print(f"clickvec broker: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from clickvec.logsetup import configure

    configure()
    sys.exit(main(sys.argv[1:]))
