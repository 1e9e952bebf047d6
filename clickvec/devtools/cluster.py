"""A cluster of N real Apache Kafka nodes (KRaft) on 127.0.0.1, from the same jars as the
single broker (broker.py): every node is broker and controller, the controllers form a
static quorum. For tests and people who want to see replication and leader failover:
`clickvec broker start --nodes 3`, `broker.start_cluster(dir, nodes=3)`.

Layout of a cluster dir: `node-1/`, `node-2/`, ... (each a broker dir as broker.py
describes) and `cluster.json` (the node dirs, written by the CLI).
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clickvec.devtools.broker import Broker, _signal, _spawn, _wait_gone
from clickvec.devtools.brokerconf import (
    KAFKA_VERSION,
    BrokerError,
    cluster_node_properties,
    fetch_jars,
    format_storage,
    java_command,
    new_cluster_id,
    read_ports,
)
from clickvec.devtools.proc import free_port, port_free

log = logging.getLogger(__name__)

CLUSTER_FILE = "cluster.json"


@dataclass
class Cluster:
    """Running nodes started by `start_cluster`; node ids are 1..N (`nodes[id - 1]`).
    A node stopped or killed keeps its data; `start_node` brings it back on its ports."""

    data_dir: Path
    nodes: list[Broker]
    die_with_parent: bool = True
    _cmds: list[list[str]] = field(default_factory=list, repr=False)

    @property
    def bootstrap(self) -> str:
        return ",".join(b.bootstrap for b in self.nodes)

    def node(self, node_id: int) -> Broker:
        return self.nodes[node_id - 1]

    def kill(self, node_id: int) -> None:
        """SIGKILL node `node_id` (no controlled shutdown: a crash) and wait for it to go."""
        b = self.node(node_id)
        _signal(b.pid, signal.SIGKILL)
        _wait_gone(b, 30.0)

    def stop_node(self, node_id: int, timeout: float = 30.0) -> None:
        self.node(node_id).stop(timeout)

    def start_node(self, node_id: int, timeout: float = 60.0, wait: bool = True) -> None:
        """Start a stopped or killed node again on its dir and ports; return once the
        cluster lists it as a live broker (at once without `wait`: `wait_ready` then)."""
        b = self.node(node_id)
        if b.alive():
            return
        for p in (b.port, b.controller_port):
            _wait_port_free(p, 30.0)
        proc = _spawn(self._cmds[node_id - 1], b.data_dir, b.log_dir, self.die_with_parent, False)
        b.process, b.pid = proc, proc.pid
        if wait:  # asked through the node itself: the others may still list it from before it died
            _wait_brokers(self, timeout, via=b)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until every node runs and each lists all of them as live brokers."""
        deadline = time.monotonic() + timeout
        for b in self.nodes:
            _wait_brokers(self, max(1.0, deadline - time.monotonic()), via=b)

    def leader(self, topic: str, partition: int, timeout: float = 30.0) -> int:
        """Node id leading `topic`'s `partition` (waits while it has none)."""
        admin = _admin(self.bootstrap)
        deadline = time.monotonic() + timeout
        while True:
            t = admin.list_topics(topic=topic, timeout=5).topics.get(topic)
            p = None if t is None else t.partitions.get(partition)
            if p is not None and p.leader > 0:
                return int(p.leader)
            if time.monotonic() > deadline:
                raise BrokerError(f"{topic}[{partition}] has no leader after {timeout:.0f} s")
            time.sleep(0.2)

    def wait_in_sync(self, topics: list[str], timeout: float = 60.0) -> None:
        """Until every partition of `topics` has all its replicas in sync (a restarted
        node has caught up), so the next node lost leaves the min ISR standing."""
        admin = _admin(self.bootstrap)
        deadline = time.monotonic() + timeout
        behind: list[str] = []
        while time.monotonic() < deadline:
            md = admin.list_topics(timeout=5)
            behind = [f"{t}[{p.id}]" for t in topics for p in md.topics[t].partitions.values()
                      if sorted(p.isrs) != sorted(p.replicas)] if all(t in md.topics for t in topics) else topics
            if not behind:
                return
            time.sleep(0.2)
        raise BrokerError(f"replicas not in sync after {timeout:.0f} s: {behind[:5]}")

    def stop(self, timeout: float = 30.0, grace: float = 5.0) -> None:
        """SIGTERM every node at once, then wait up to `timeout`. A node's controlled
        shutdown needs a controller quorum: once a majority of the nodes is gone the
        rest cannot finish it (they would wait minutes), so they get `grace` seconds,
        then SIGKILL; their logs are recovered on the next start, as after a crash."""
        live = [b for b in self.nodes if b.alive()]
        for b in live:
            _signal(b.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        quorum_lost_at: float | None = None
        while live and time.monotonic() < deadline:
            live = [b for b in live if b.alive()]
            if quorum_lost_at is None and len(live) <= len(self.nodes) // 2:
                quorum_lost_at = time.monotonic()
            if quorum_lost_at is not None and time.monotonic() - quorum_lost_at > grace:
                break
            time.sleep(0.1)
        for b in live:
            if b.alive():
                log.info("node pid %d still shutting down without a quorum; killing it", b.pid)
                _signal(b.pid, signal.SIGKILL)
                _wait_gone(b, 10.0)

    def state(self) -> dict[str, Any]:
        return {"bootstrap": self.bootstrap, "nodes": [str(b.data_dir) for b in self.nodes],
                "kafka_version": KAFKA_VERSION}

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _admin(bootstrap: str) -> Any:
    from confluent_kafka.admin import AdminClient

    # log_level 2: no "connection refused" lines for nodes that are down.
    return AdminClient({"bootstrap.servers": bootstrap, "socket.connection.setup.timeout.ms": 2000,
                        "log_level": 2})


def _wait_port_free(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not port_free(port):
        if time.monotonic() > deadline:
            raise BrokerError(f"port {port} is still in use by another process")
        time.sleep(0.2)


def _wait_brokers(c: Cluster, timeout: float, via: Broker | None = None) -> None:
    admin = _admin(via.bootstrap if via is not None else c.bootstrap)
    want = set(range(1, len(c.nodes) + 1))
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for i, b in enumerate(c.nodes, 1):
            if not b.alive():
                code = b.process.returncode if b.process is not None else "?"
                raise BrokerError(f"Kafka node {i} exited during start-up (exit {code})", b.log_tail(),
                                  b.log_path)
        try:
            have = set(admin.list_topics(timeout=2).brokers)
            if have >= want:
                return
            last = f"live brokers {sorted(have)}"
        except Exception as e:  # KafkaException while no listener is up yet
            last = str(e)
        time.sleep(0.2)
    tails = "\n".join(f"node {i}: {b.log_tail(8)}" for i, b in enumerate(c.nodes, 1))
    raise BrokerError(f"Kafka cluster at {c.bootstrap} not ready within {timeout:.0f} s ({last})", tails)


def _prepare(data_dir: Path, nodes: int, extra: dict[str, str] | None, reset: bool) -> tuple[list[Path], bool]:
    """The node dirs, with their server.properties written; whether they are formatted.
    A formatted cluster keeps its ports and data: only `reset` deletes them."""
    dirs = [data_dir / f"node-{i}" for i in range(1, nodes + 1)]
    if reset:
        log.warning("--reset: deleting the cluster data in %s", data_dir)
        for d in dirs:
            shutil.rmtree(d / "data", ignore_errors=True)
    formatted = [(d / "data" / "meta.properties").is_file() for d in dirs]
    hint = "or start with --reset to delete this cluster's data"
    if all(formatted):
        read = [read_ports(d / "server.properties") for d in dirs]
        ports = [p for p in read if p is not None]
        if len(ports) != len(read):
            raise BrokerError(f"a node's server.properties in {data_dir} names no listener ports; restore it, {hint}")
        for p in (p for pair in ports for p in pair):
            if not port_free(p):
                raise BrokerError(f"port {p} of the cluster in {data_dir} is in use by another process; "
                                  f"stop that process, {hint}")
        log.info("reusing formatted cluster dir %s", data_dir)
        _write_properties(dirs, ports, extra)  # the controllers' addresses stay as formatted
        return dirs, True
    if any(formatted) or any((d / "data").is_dir() and any((d / "data").iterdir()) for d in dirs):
        raise BrokerError(f"{data_dir} holds a partial cluster (other node count?); move it away, {hint}")
    taken: list[int] = []
    try:
        for _ in range(2 * nodes):
            taken.append(free_port(exclude=taken))
    except OSError as e:
        raise BrokerError(str(e)) from e
    _write_properties(dirs, list(zip(taken[0::2], taken[1::2], strict=True)), extra)
    return dirs, False


def _write_properties(dirs: list[Path], ports: list[tuple[int, int]], extra: dict[str, str] | None) -> None:
    for i, d in enumerate(dirs, 1):
        (d / "logs").mkdir(parents=True, exist_ok=True)
        (d / "server.properties").write_text(cluster_node_properties(d, i, ports, extra))


def start_cluster(
    data_dir: str | Path,
    nodes: int = 3,
    timeout: float = 90.0,
    heap: str = "384m",
    extra_properties: dict[str, str] | None = None,
    die_with_parent: bool = True,
    reset: bool = False,
    jvm_opts: Sequence[str] = (),
) -> Cluster:
    """Start `nodes` KRaft nodes (broker + controller each) in `data_dir`/node-N; return
    once the cluster lists all of them. As `broker.start`: a formatted dir is reused with
    its ports and data, only `reset` deletes them, and `die_with_parent` ties the JVMs to
    the calling thread."""
    if nodes < 1:
        raise BrokerError(f"a cluster needs at least one node, not {nodes}")
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    libs = fetch_jars()
    java = shutil.which("java")
    if java is None:
        raise BrokerError("`java` (17+) is not on PATH; the Kafka broker needs it")
    dirs, reused = _prepare(data_dir, nodes, extra_properties, reset)
    classpath = f"{libs}/*"
    if not reused:
        cluster_id = new_cluster_id()
        with ThreadPoolExecutor(nodes) as pool:  # one JVM each: at once, not one after another
            list(pool.map(lambda d: format_storage(java, classpath, d / "server.properties", cluster_id), dirs))
    cmds = [java_command(java, heap, d / "logs", classpath, d / "server.properties", jvm_opts) for d in dirs]
    members: list[Broker] = []
    c = Cluster(data_dir, members, die_with_parent, cmds)
    t0 = time.monotonic()
    try:
        for d, cmd in zip(dirs, cmds, strict=True):
            port, controller_port = read_ports(d / "server.properties") or (0, 0)
            proc = _spawn(cmd, d, d / "logs", die_with_parent, False)
            members.append(Broker(d, port, controller_port, proc.pid, proc))
        c.wait_ready(timeout)
    except BaseException:
        c.stop(timeout=10)
        raise
    log.info("Kafka %s cluster of %d nodes up at %s in %.1f s", KAFKA_VERSION, nodes, c.bootstrap,
             time.monotonic() - t0)
    return c


def write_cluster_state(c: Cluster) -> Path:
    path = c.data_dir / CLUSTER_FILE
    path.write_text(json.dumps(c.state(), indent=2))
    return path


def read_cluster_nodes(data_dir: Path) -> list[Path] | None:
    """The node dirs recorded in `data_dir`'s cluster.json, or None when there is none."""
    try:
        return [Path(p) for p in json.loads((data_dir / CLUSTER_FILE).read_text())["nodes"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
