"""A real Apache Kafka broker (KRaft, combined broker + controller) on 127.0.0.1.

The jars come from Maven Central through `deploy/kafka/pom.xml`, copied once into a
cache dir; the broker runs as `java ... kafka.Kafka server.properties`, exactly as the
release tarball's scripts would start it. Used by the test suite, by `clickvec run` and
by people: `clickvec broker start|stop|status|fetch`.

Layout of a broker dir: `server.properties`, `data/` (log.dirs), `logs/server.log`
(log4j file appender), `logs/console.out` (stdout/stderr of the JVM), `broker.json`
(state written by the CLI so another process can stop it).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from clickvec.errors import ClickvecError

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy" / "kafka"
POM = DEPLOY_DIR / "pom.xml"
LOG4J_CONFIG = DEPLOY_DIR / "log4j2.properties"
MARKER = ".complete"
STATE_FILE = "broker.json"
DEFAULT_DIR = Path(".clickvec") / "kafka"
# Jars without which the broker cannot start; the marker alone could outlive a deleted jar.
_REQUIRED_JARS = (
    f"kafka_2.13-{KAFKA_VERSION}.jar",
    f"kafka-clients-{KAFKA_VERSION}.jar",
    "log4j-slf4j-impl-",
)


class BrokerError(ClickvecError):
    """The local Kafka broker could not be fetched, started or stopped.

    The message carries the tail of the broker log; the full log is at `log_path`.
    Action: read the log; check `java -version` (17+), `mvn -v`, free disk and ports.
    """

    def __init__(self, message: str, log_tail: str = "", log_path: Path | None = None) -> None:
        text = message
        if log_path is not None:
            text += f"\nbroker log: {log_path}"
        if log_tail:
            text += "\n--- broker log tail ---\n" + log_tail
        super().__init__(text)
        self.log_tail = log_tail
        self.log_path = log_path


# ----------------------------------------------------------------------------- jars


def cache_root() -> Path:
    return Path(os.environ.get("CLICKVEC_CACHE") or Path.home() / ".cache" / "clickvec")


def libs_dir() -> Path:
    return cache_root() / f"kafka-{KAFKA_VERSION}" / "libs"


def _libs_complete(libs: Path) -> bool:
    if not (libs / MARKER).is_file():
        return False
    names = [p.name for p in libs.glob("*.jar")]
    return all(any(n.startswith(req) for n in names) for req in _REQUIRED_JARS)


def fetch_jars(libs: Path | None = None) -> Path:
    """Copy the broker's runtime jars into `libs` with Maven, once; return the dir.

    Safe to call from several processes at once (a file lock serialises the copy).
    """
    libs = libs or libs_dir()
    if _libs_complete(libs):
        return libs
    import fcntl

    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _libs_complete(libs):
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError(
                "Maven (`mvn`) is not on PATH; it is needed once to fetch the Kafka jars"
            )
        tmp = libs.parent / f"libs.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [
            mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
            "-DincludeScope=runtime", f"-DoutputDirectory={tmp}",
        ]  # fmt: skip
        log.info("fetching Kafka %s jars into %s", KAFKA_VERSION, libs)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
            raise BrokerError(f"mvn failed (exit {proc.returncode}): {' '.join(cmd)}", tail)
        (tmp / MARKER).write_text(f"kafka {KAFKA_VERSION}\n")
        shutil.rmtree(libs, ignore_errors=True)
        tmp.rename(libs)
        log.info("fetched %d jars in %.1f s", len(list(libs.glob("*.jar"))), time.monotonic() - t0)
    return libs


# --------------------------------------------------------------------------- broker


def free_port(exclude: tuple[int, ...] = ()) -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in exclude:
            return port
    raise BrokerError("could not find a free TCP port on 127.0.0.1")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def new_cluster_id() -> str:
    """A Kafka cluster id: a random UUID as unpadded base64url (what `StorageTool
    random-uuid` prints), never starting with '-' so it cannot be read as a flag."""
    while True:
        s = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not s.startswith("-"):
            return s


def server_properties(
    data_dir: Path, port: int, controller_port: int, extra: dict[str, str] | None = None
) -> str:
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(data_dir / "data"),
        "num.partitions": "1",
        "auto.create.topics.enable": "true",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
    }
    props.update(extra or {})
    return "".join(f"{k}={v}\n" for k, v in props.items())


def _read_ports(props_path: Path) -> tuple[int, int] | None:
    try:
        for line in props_path.read_text().splitlines():
            if line.startswith("listeners="):
                ports = dict(
                    (ep.split("://")[0], int(ep.rsplit(":", 1)[1]))
                    for ep in line.split("=", 1)[1].split(",")
                )
                return ports["PLAINTEXT"], ports["CONTROLLER"]
    except (OSError, ValueError, KeyError, IndexError):
        return None
    return None


def _tail(path: Path, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM the broker when its parent dies, so a
    killed test run does not leave a JVM behind (Linux only)."""
    os.setsid()
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


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
        text = _tail(self.log_path, n)
        if not text or not self.alive():
            console = _tail(self.console_path, n)
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


def start(
    data_dir: str | Path,
    port: int = 0,
    controller_port: int = 0,
    timeout: float = 60.0,
    heap: str = "512m",
    extra_properties: dict[str, str] | None = None,
    die_with_parent: bool = True,
    foreground: bool = False,
) -> Broker:
    """Start a single-node KRaft broker whose files live in `data_dir`; return once a
    client can list topics. `port=0` picks free ports. A dir formatted by an earlier
    start is reused (its data kept) when its ports are still free and match `port`;
    otherwise it is reformatted from scratch.

    `die_with_parent` (Linux) SIGTERMs the broker when the *thread* that called `start`
    exits, so a killed test run leaves no JVM behind; call it from a long-lived thread,
    or pass False (the CLI does) for a broker that outlives its starter."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    libs = fetch_jars()
    props_path = data_dir / "server.properties"
    old = _read_ports(props_path) if (data_dir / "data" / "meta.properties").is_file() else None
    reuse = (
        old is not None
        and port in (0, old[0])
        and (controller_port in (0, old[1]))
        and _port_free(old[0])
        and _port_free(old[1])
        and not extra_properties
    )
    if reuse:
        assert old is not None
        port, controller_port = old
        log.info("reusing formatted broker dir %s", data_dir)
    else:
        port = port or free_port()
        controller_port = controller_port or free_port(exclude=(port,))
        # A formatted dir keeps its cluster id and voter endpoints: start fresh.
        shutil.rmtree(data_dir / "data", ignore_errors=True)
        props_path.write_text(server_properties(data_dir, port, controller_port, extra_properties))
    log_dir = data_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    java = shutil.which("java")
    if java is None:
        raise BrokerError("`java` (17+) is not on PATH; the Kafka broker needs it")
    classpath = f"{libs}/*"

    if not reuse:
        fmt = subprocess.run(
            [java, "-cp", classpath, "kafka.tools.StorageTool", "format", "--standalone",
             "-t", new_cluster_id(), "-c", str(props_path)],
            capture_output=True, text=True,
        )  # fmt: skip
        if fmt.returncode != 0:
            raise BrokerError(
                f"kafka-storage format failed (exit {fmt.returncode})",
                "\n".join((fmt.stdout + fmt.stderr).splitlines()[-40:]),
            )

    cmd = [
        java, f"-Xmx{heap}",
        "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true",
        f"-Dkafka.logs.dir={log_dir}", f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
        "-cp", classpath, "kafka.Kafka", str(props_path),
    ]  # fmt: skip
    if foreground:
        out = None
        preexec = None
        new_session = False
    else:
        out = open(log_dir / "console.out", "ab")
        preexec = _die_with_parent if die_with_parent and sys.platform.startswith("linux") else None
        new_session = preexec is None
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT if out else None,
            cwd=data_dir, start_new_session=new_session, preexec_fn=preexec,
        )  # fmt: skip
    finally:
        if out is not None:
            out.close()
    b = Broker(data_dir, port, controller_port, proc.pid, proc)
    t0 = time.monotonic()
    _wait_ready(b, timeout)
    log.info(
        "Kafka %s up at %s in %.1f s (pid %d, log %s)",
        KAFKA_VERSION,
        b.bootstrap,
        time.monotonic() - t0,
        b.pid,
        b.log_path,
    )
    return b


# ------------------------------------------------------------------- state file (CLI)


def write_state(b: Broker) -> Path:
    path = b.data_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "pid": b.pid,
                "bootstrap": b.bootstrap,
                "port": b.port,
                "controller_port": b.controller_port,
                "data_dir": str(b.data_dir),
                "log_path": str(b.log_path),
                "kafka_version": KAFKA_VERSION,
                "started_at": time.time(),
            },
            indent=2,
        )
    )
    tmp.replace(path)
    return path


def read_state(data_dir: str | Path) -> Broker | None:
    """The broker recorded in `data_dir`'s state file, or None when there is none."""
    data_dir = Path(data_dir).resolve()
    try:
        st = json.loads((data_dir / STATE_FILE).read_text())
        return Broker(data_dir, int(st["port"]), int(st["controller_port"]), int(st["pid"]))
    except (OSError, ValueError, KeyError):
        return None


# ------------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clickvec broker", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    ps = sub.add_parser("start", help="start a broker and print bootstrap=HOST:PORT")
    ps.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help="broker dir (default: %(default)s)"
    )
    ps.add_argument("--port", type=int, default=0, help="client port (default: a free one)")
    ps.add_argument("--controller-port", type=int, default=0)
    ps.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the broker")
    ps.add_argument("--heap", default="512m")
    ps.add_argument(
        "--foreground", action="store_true", help="stay attached; Ctrl-C stops the broker"
    )
    for name, help_ in (
        ("stop", "stop the broker recorded in --dir"),
        ("status", "is it running?"),
    ):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    sub.add_parser("fetch", help="only download the broker jars into the cache")
    args = p.parse_args(argv)

    try:
        if args.action == "fetch":
            print(f"libs={fetch_jars()}")
            return 0
        if args.action == "status":
            b = read_state(args.dir)
            if b is None or not b.alive():
                print(f"stopped (no running broker recorded in {args.dir})")
                return 1
            print(f"bootstrap={b.bootstrap}\npid={b.pid}\nlog={b.log_path}\nrunning")
            return 0
        if args.action == "stop":
            b = read_state(args.dir)
            if b is None:
                print(f"no broker recorded in {args.dir}")
                return 0
            b.stop()
            (b.data_dir / STATE_FILE).unlink(missing_ok=True)
            print(f"stopped pid={b.pid}")
            return 0
        # start
        old = read_state(args.dir)
        if old is not None and old.alive():
            print(f"bootstrap={old.bootstrap}")
            log.info("broker already running (pid %d)", old.pid)
            return 0
        b = start(
            args.dir, port=args.port, controller_port=args.controller_port, timeout=args.timeout,
            heap=args.heap, die_with_parent=False, foreground=args.foreground,
        )  # fmt: skip
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
    except BrokerError as e:
        print(f"clickvec broker: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(main(sys.argv[1:]))
