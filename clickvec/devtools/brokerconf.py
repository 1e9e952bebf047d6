"""What a local broker is made of, without running it: the jars (fetched once with
Maven from `pom.xml`), the log4j set-up, `server.properties`, the cluster id and the
state file the CLI leaves so another process can find the broker.

`pom.xml` and `log4j2.properties` ship with the package (clickvec/devtools/kafka/), so
an installed wheel can fetch and start a broker as well as a repository checkout.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clickvec.errors import ClickvecError

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
MARKER = ".complete"
STATE_FILE = "broker.json"
DEFAULT_DIR = Path(".clickvec") / "kafka"
_HERE = Path(__file__).resolve().parent
_FILE_DIRS = (_HERE / "kafka",)
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


def broker_file(name: str) -> Path:
    """`pom.xml` or `log4j2.properties`, shipped with the package."""
    for d in _FILE_DIRS:
        if (d / name).is_file():
            return d / name
    raise BrokerError(f"{name} not found in {' or '.join(str(d) for d in _FILE_DIRS)} "
                      "(a broken install: reinstall clickvec)")


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
            mvn, "-q", "-B", "-f", str(broker_file("pom.xml")), "dependency:copy-dependencies",
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


# --------------------------------------------------------------------- configuration


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
        **_listeners(data_dir, port, controller_port),
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


def _listeners(data_dir: Path, port: int, controller_port: int) -> dict[str, str]:
    return {
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(data_dir / "data"),
    }


def cluster_node_properties(
    node_dir: Path, node_id: int, ports: list[tuple[int, int]], extra: dict[str, str] | None = None
) -> str:
    """server.properties of node `node_id` (1-based) of a loopback cluster whose nodes
    listen on `ports` [(client, controller)]: every node is broker and controller, and
    the controllers form a static quorum (`controller.quorum.voters`).

    Internal topics are replicated min(3, nodes) times with min ISR 2 where that leaves a
    node to lose; the topics a client creates keep Kafka's defaults (clickvec's own topic
    defaults are set by the client, clickvec/kafka.py). Failure detection is quicker than
    Kafka's defaults (a fenced broker after 4 s instead of 9 s) so a dead leader is
    replaced within seconds; fewer offsets/transaction partitions keep start-up short."""
    n = len(ports)
    port, controller_port = ports[node_id - 1]
    rf, min_isr = str(min(3, n)), str(2 if n >= 3 else 1)
    voters = ",".join(f"{i}@127.0.0.1:{c}" for i, (_, c) in enumerate(ports, 1))
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.voters": voters,
        **_listeners(node_dir, port, controller_port),
        "num.partitions": "1",
        "auto.create.topics.enable": "true",
        "offsets.topic.replication.factor": rf,
        "offsets.topic.num.partitions": "6",
        "transaction.state.log.replication.factor": rf,
        "transaction.state.log.min.isr": min_isr,
        "transaction.state.log.num.partitions": "6",
        "share.coordinator.state.topic.replication.factor": rf,
        "share.coordinator.state.topic.min.isr": min_isr,
        "group.initial.rebalance.delay.ms": "0",
        "broker.heartbeat.interval.ms": "500",
        "broker.session.timeout.ms": "4000",
    }
    props.update(extra or {})
    return "".join(f"{k}={v}\n" for k, v in props.items())


def read_ports(props_path: Path) -> tuple[int, int] | None:
    """(client port, controller port) of an existing server.properties."""
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


def format_storage(java: str, classpath: str, props_path: Path, cluster_id: str = "") -> None:
    """`kafka-storage format`: `--standalone` with a new cluster id, or, given the
    `cluster_id` of a cluster whose voters server.properties names, one of its nodes."""
    how = ["-t", cluster_id] if cluster_id else ["--standalone", "-t", new_cluster_id()]
    # A tool that runs for a second or two: the C1 compiler alone and the serial collector
    # spend less CPU on it than the JVM's defaults (a third less on two cores).
    fmt = subprocess.run(
        [java, "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-cp", classpath, "kafka.tools.StorageTool",
         "format", *how, "-c", str(props_path)],
        capture_output=True, text=True,
    )
    if fmt.returncode != 0:
        raise BrokerError(
            f"kafka-storage format failed (exit {fmt.returncode})",
            "\n".join((fmt.stdout + fmt.stderr).splitlines()[-40:]),
        )


def java_command(java: str, heap: str, log_dir: Path, classpath: str, props_path: Path,
                 jvm_opts: Sequence[str] = ()) -> list[str]:
    """The broker's JVM command line, as the release tarball's scripts would build it
    (plus `jvm_opts`)."""
    return [
        java, f"-Xmx{heap}",
        "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true", *jvm_opts,
        f"-Dkafka.logs.dir={log_dir}", f"-Dlog4j2.configurationFile={broker_file('log4j2.properties')}",
        "-cp", classpath, "kafka.Kafka", str(props_path),
    ]  # fmt: skip


# ------------------------------------------------------------------- state file (CLI)


def state_dict(pid: int, port: int, controller_port: int, data_dir: Path, log_path: Path) -> dict[str, Any]:
    return {
        "pid": pid,
        "bootstrap": f"127.0.0.1:{port}",
        "port": port,
        "controller_port": controller_port,
        "data_dir": str(data_dir),
        "log_path": str(log_path),
        "kafka_version": KAFKA_VERSION,
        "started_at": time.time(),
    }


def write_state_file(data_dir: Path, state: dict[str, Any]) -> Path:
    path = data_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)
    return path


def read_state_file(data_dir: Path) -> tuple[int, int, int] | None:
    """(port, controller port, pid) recorded in `data_dir`, or None."""
    try:
        st = json.loads((data_dir / STATE_FILE).read_text())
        return int(st["port"]), int(st["controller_port"]), int(st["pid"])
    except (OSError, ValueError, KeyError):
        return None
