"""Shared fixtures: one real Apache Kafka broker per test session (clickvec.devtools.broker).

A test that needs the broker fails, with the broker's log tail, when it cannot start;
it never skips. Set CLICKVEC_BOOTSTRAP=HOST:PORT to run against an external broker.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/kafka_util.py importable by name


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("CLICKVEC_BOOTSTRAP")
    if external:
        yield external
        return
    from clickvec.devtools import broker

    data_dir = tmp_path_factory.mktemp("kafka")
    try:
        b = broker.start(data_dir)
    except Exception as e:  # BrokerError carries the log tail; anything else is as fatal
        pytest.fail(f"the Kafka broker (clickvec.devtools.broker) could not start:\n{e}", pytrace=False)
    try:
        yield b.bootstrap
    finally:
        b.stop()


def create_topic(admin, partitions: int = 4, name_prefix: str = "t") -> str:
    """A uuid-named topic, returned once the broker reports all its partitions with leaders."""
    from confluent_kafka.admin import NewTopic

    name = f"{name_prefix}-{uuid.uuid4().hex}"
    admin.create_topics([NewTopic(name, num_partitions=partitions)], operation_timeout=30)[
        name
    ].result(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        t = admin.list_topics(topic=name, timeout=5).topics.get(name)
        if (
            t is not None
            and t.error is None
            and len(t.partitions) == partitions
            and all(p.leader >= 0 for p in t.partitions.values())
        ):
            return name
        time.sleep(0.05)
    pytest.fail(f"topic {name} did not appear with {partitions} partitions within 30 s")


@pytest.fixture
def new_topic(kafka_bootstrap: str) -> Callable[..., str]:
    """Factory: `new_topic(partitions=4, name_prefix="t")` creates a uuid-named topic
    and returns its name once the broker reports all its partitions."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    return lambda partitions=4, name_prefix="t": create_topic(admin, partitions, name_prefix)


@pytest.fixture
def new_group() -> Callable[[], str]:
    """Factory: `new_group()` returns a fresh uuid consumer-group id."""
    return lambda: f"g-{uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def stream_bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small exported model bundle (random weights over the synthetic catalogue) for
    stream tests: the stream's correctness property does not depend on training."""
    import torch

    from clickvec.devtools.synth import SynthConfig, generate_table
    from clickvec.export.writer import export_bundle
    from clickvec.features import FeatureSpec
    from clickvec.training.checkpoint import save_checkpoint
    from clickvec.training.model import Encoder, ModelConfig

    d = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    items = generate_table(SynthConfig(n_users=300, seed=0)).column("item_id").to_pylist()
    spec = FeatureSpec.from_items(items)
    model = Encoder(ModelConfig(spec.n_items, spec.n_event_types, spec.n_gap_buckets,
                                item_dim=16, type_dim=4, gap_dim=4, hidden=32, z_dim=8))
    with torch.no_grad():  # livelier than the default init, so vectors move visibly
        model.item_emb.weight.mul_(10.0)
    model.eval()
    save_checkpoint(d / "run" / "best.pt", model, spec, {"purpose": "stream tests"})
    export_bundle(d / "run", d / "bundle")
    return d / "bundle"


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """(bundle trained on some users' normal events, held-out table with planted fraud),
    shared by the alerting and recommendation tests: trained once per session."""
    from test_alerts import trained_setup

    return trained_setup(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="session")
def streamed_held(kafka_bootstrap: str, trained, tmp_path_factory: pytest.TempPathFactory):
    """The real worker run once over the held-out events: (vector topic, vectors)."""
    from confluent_kafka.admin import AdminClient
    from test_alerts import stream_vectors, table_events

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})

    def topic(partitions: int = 4, name_prefix: str = "t") -> str:
        return create_topic(admin, partitions, name_prefix)

    bundle_path, held = trained
    return stream_vectors(kafka_bootstrap, topic, lambda: f"g-{uuid.uuid4().hex}", bundle_path,
                          table_events(held), tmp_path_factory.mktemp("held-stream"))


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (Debian's package, fetched on first use into
    ~/.cache/clickvec/redis by clickvec.devtools.redis) for the session. Set
    CLICKVEC_REDIS_URL to use a running one."""
    external = os.environ.get("CLICKVEC_REDIS_URL")
    if external:
        yield external
        return
    from clickvec.devtools import redis as redis_dev

    try:
        server = redis_dev.start(tmp_path_factory.mktemp("redis"))
    except Exception as e:  # RedisError names the cause; anything else is as fatal
        pytest.fail(f"redis-server (clickvec.devtools.redis) could not start:\n{e}", pytrace=False)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def second_bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another model like `stream_bundle_path` (same catalogue and sizes, other random
    weights: seed 1): the new model of a rollout."""
    import torch

    from clickvec.devtools.synth import SynthConfig, generate_table
    from clickvec.export.writer import export_bundle
    from clickvec.features import FeatureSpec
    from clickvec.training.checkpoint import save_checkpoint
    from clickvec.training.model import Encoder, ModelConfig

    d = tmp_path_factory.mktemp("bundle2")
    torch.manual_seed(1)
    items = generate_table(SynthConfig(n_users=300, seed=0)).column("item_id").to_pylist()
    spec = FeatureSpec.from_items(items)
    model = Encoder(ModelConfig(spec.n_items, spec.n_event_types, spec.n_gap_buckets,
                                item_dim=16, type_dim=4, gap_dim=4, hidden=32, z_dim=8))
    with torch.no_grad():
        model.item_emb.weight.mul_(10.0)
    model.eval()
    save_checkpoint(d / "run" / "best.pt", model, spec, {"purpose": "rollout tests (new model)"})
    export_bundle(d / "run", d / "bundle")
    return d / "bundle"
