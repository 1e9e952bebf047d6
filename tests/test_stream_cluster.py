"""The worker on a 3-node KRaft cluster (clickvec.devtools.cluster) while the leader of
an input partition, and then of a changelog partition, is SIGKILLed mid-stream and its
node started again: nothing lost, nothing applied twice, every user exact, and the worker
never stops; then it stops cleanly on SIGTERM while a third leader's node is down.

Topics clickvec creates are replicated 3 times with `min.insync.replicas` 2, so an
acknowledged write (acks=all) lives on two nodes and a node lost loses none of it."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import stream_util as su

from clickvec.bundle.reader import load_bundle
from clickvec.devtools.produce import produce_events
from clickvec.devtools.synth import SynthConfig, generate_events
from clickvec.kafka import KafkaConnection


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """Three nodes, small heaps and C1-only JITs: three JVMs share this machine's
    cores with the worker, and start-up time is what a test pays for them."""
    from clickvec.devtools import broker

    try:
        c = broker.start_cluster(tmp_path_factory.mktemp("cluster"), nodes=3, heap="384m",
                                 jvm_opts=("-XX:TieredStopAtLevel=1",))
    except Exception as e:  # BrokerError carries the log tails
        pytest.fail(f"the 3-node Kafka cluster could not start:\n{e}", pytrace=False)
    try:
        yield c
    finally:
        for node in range(1, len(c.nodes) + 1):  # its data is thrown away: no clean shutdown to wait for
            c.kill(node)


def _topic_settings(bootstrap: str, topics: list[str]) -> dict[str, tuple[set[int], str]]:
    """Per topic: (replica counts of its partitions, its min.insync.replicas)."""
    from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

    admin = AdminClient({"bootstrap.servers": bootstrap})
    md = admin.list_topics(timeout=10)
    res = {t: ConfigResource(ResourceType.TOPIC, t) for t in topics}
    futures = admin.describe_configs(list(res.values()))
    return {t: ({len(p.replicas) for p in md.topics[t].partitions.values()},
                futures[res[t]].result(60)["min.insync.replicas"].value) for t in topics}


def _wait_topic(bootstrap: str, topic: str, w: su.WorkerProcess, timeout: float = 60) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout
    while topic not in admin.list_topics(timeout=10).topics:
        assert w.alive() and time.monotonic() < deadline, f"no topic {topic}:\n{w.log_tail()}"
        time.sleep(0.2)


def _kill_leader(cluster, topic: str, partition: int) -> int:
    node = cluster.leader(topic, partition)
    cluster.kill(node)
    return node


class Feed:
    """The events at `rate` per second until `rush()`, then the rest at once: the kills
    fall while events flow, and the test does not wait out a fixed rate after them."""

    def __init__(self, events: list, rate: float) -> None:
        self.events, self.rate, self.rushing = events, rate, threading.Event()

    def rush(self) -> None:
        self.rushing.set()

    def __iter__(self):
        t = time.monotonic()
        for e in self.events:
            if not self.rushing.is_set():
                t += 1.0 / self.rate
                time.sleep(max(0.0, t - time.monotonic()))
            yield e


@pytest.mark.broker
@pytest.mark.slow
def test_leader_loss_mid_stream_loses_nothing(cluster, stream_bundle_path, tmp_path):
    boot = cluster.bootstrap
    tag = uuid.uuid4().hex[:8]
    src, out, dlq, group = f"clicks-{tag}", f"vectors-{tag}", f"dlq-{tag}", f"g-{tag}"
    changelog = f"{group}-user-state-changelog"
    KafkaConnection(brokers=boot).ensure_topic(src, 4)  # as `clickvec produce` creates it
    events = generate_events(SynthConfig(n_users=300, seed=31, mean_events=20))[:4000]
    bundle = load_bundle(stream_bundle_path, providers="cpu")
    feed, produced = Feed(events, rate=150.0), []
    producer = threading.Thread(target=lambda: produced.append(produce_events(feed, boot, src)), daemon=True)
    producer.start()
    w = su.WorkerProcess(boot, stream_bundle_path, src, out, dlq, group, tmp_path / "s", tmp_path / "w.log").start()
    _wait_topic(boot, out, w)  # the worker creates it
    reader = su.TopicReader(boot, out)

    def more(n: int):
        """A `wait_for` condition: `n` more distinct vectors than read so far."""
        want = su.VectorLog.of(reader.messages).distinct() + n
        return lambda m: su.VectorLog.of(m).distinct() >= want

    killed = []
    try:
        # Each killed node is started again at once, as a supervisor would: its JVM takes
        # seconds to come up, and the worker goes on meanwhile with the node down.
        su.wait_for(reader, more(400), 90, [w])
        killed.append(_kill_leader(cluster, src, 0))
        cluster.start_node(killed[-1], wait=False)
        su.wait_for(reader, more(300), 90, [w])
        cluster.wait_ready()
        cluster.wait_in_sync([src, out, dlq, changelog])  # so the next loss leaves 2 in sync
        killed.append(_kill_leader(cluster, changelog, 0))
        cluster.start_node(killed[-1], wait=False)
        su.wait_for(reader, more(300), 90, [w])
        feed.rush()
        producer.join(60)
        su.wait_for(reader, lambda m: su.VectorLog.of(m).distinct() >= len(events), 90, [w])
        reader.poll(1.0)
        assert w.alive(), "the worker stopped"
        # SIGTERM while a leader's node is down: the consumer's fetches to it wait in
        # their retry backoff, which once hung the worker's shutdown.
        cluster.wait_ready()
        settings = _topic_settings(boot, [src, out, dlq, changelog])  # every node up to answer
        killed.append(_kill_leader(cluster, src, 0))
        time.sleep(1.0)
    finally:
        feed.rush()
        t0 = time.monotonic()
        rc = w.stop(timeout=60)
        stop_s = time.monotonic() - t0
        reader.close()
    assert rc == 0, w.log_tail()
    assert stop_s < 30, f"the worker took {stop_s:.0f}s to stop"
    assert produced == [len(events)]
    stats = su.check_vectors(bundle, events, su.VectorLog.of(reader.messages))
    assert stats["users"] == len({e.user_id for e in events})
    assert settings == {t: ({3}, "2") for t in settings}, settings
    print("leader loss x3 (nodes killed):", killed, stats, f"stop {stop_s:.1f}s")


def test_broker_cli_keeps_cluster_and_single_broker_dirs_apart(tmp_path, capsys):
    """`clickvec broker start` on a cluster dir (or `--nodes 3` on a broker dir) refuses in
    one line rather than formatting a second, empty broker beside the data."""
    from clickvec.devtools.broker import main

    (tmp_path / "c" / "node-1").mkdir(parents=True)
    (tmp_path / "c" / "node-1" / "server.properties").write_text("node.id=1\n")
    (tmp_path / "b" / "data").mkdir(parents=True)
    (tmp_path / "b" / "data" / "meta.properties").write_text("node.id=1\n")
    assert main(["start", "--dir", str(tmp_path / "c")]) == 1
    assert "holds a cluster; start it with --nodes N" in capsys.readouterr().err
    assert main(["start", "--dir", str(tmp_path / "b"), "--nodes", "3"]) == 1
    assert "holds a single broker; start it without --nodes" in capsys.readouterr().err


@pytest.mark.broker
def test_topics_on_a_single_broker_have_one_replica_and_min_isr_1(kafka_bootstrap):
    name = f"single-{uuid.uuid4().hex}"
    assert KafkaConnection(brokers=kafka_bootstrap).ensure_topic(name, 2)
    assert _topic_settings(kafka_bootstrap, [name]) == {name: ({1}, "1")}
