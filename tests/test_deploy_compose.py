"""deploy/compose.yaml: valid under the Compose Specification's JSON schema (vendored,
deploy/schemas/compose-spec.json), and a stack that works: Kafka in KRaft mode, a one-shot
model build before anything reads the model, two workers of one consumer group with their
own state volumes and a /healthz healthcheck, alerts and recommend; every clickvec command
in it parses with the command's own flags."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from test_deploy_support import (
    DEPLOY,
    load_schema,
    load_yaml_all,
    parse_cli,
    schema_errors,
    worker_config,
)

COMPOSE = DEPLOY / "compose.yaml"


def _compose() -> dict[str, Any]:
    (doc,) = load_yaml_all(COMPOSE.read_text())
    return doc


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with nothing set (the documented defaults)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def _services() -> dict[str, Any]:
    return _compose()["services"]


def test_valid_under_the_compose_spec_schema() -> None:
    schema = load_schema("compose-spec.json")
    assert schema.get("title") == "Compose Specification"
    assert schema_errors(schema, _compose()) == []
    # The schema is strict enough to matter: a misspelt service key fails.
    bad = copy.deepcopy(_compose())
    bad["services"]["worker-1"]["helthcheck"] = bad["services"]["worker-1"].pop("healthcheck")
    assert any("helthcheck" in e for e in schema_errors(schema, bad))


def test_kafka_is_kraft_on_the_official_image() -> None:
    kafka = _services()["kafka"]
    assert kafka["image"].startswith("apache/kafka:") and not kafka["image"].endswith(":latest")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert "healthcheck" in kafka


def _command(name: str) -> list[str]:
    return [_interpolate(str(a)) for a in _services()[name]["command"]]


def test_two_workers_one_group_own_state_and_healthz() -> None:
    services = _services()
    workers = sorted(n for n, s in services.items() if s.get("command", [None])[0] == "stream")
    assert len(workers) == 2
    groups, states = set(), set()
    for name in workers:
        svc = services[name]
        cfg = worker_config(_command(name), {k: str(v) for k, v in svc.get("environment", {}).items()})
        groups.add(cfg.group)
        assert cfg.web_host == "0.0.0.0" and cfg.brokers == "kafka:9092"
        assert cfg.model.startswith("/models/")
        (state,) = [v for v in svc["volumes"] if v.endswith(":/var/lib/clickvec")]
        assert cfg.state_dir.startswith("/var/lib/clickvec/")
        states.add(state.split(":")[0])
        test = " ".join(svc["healthcheck"]["test"])
        assert f"127.0.0.1:{cfg.web_port}/healthz" in test
        deps = svc["depends_on"]
        assert deps["kafka"]["condition"] == "service_healthy"
        assert deps["model"]["condition"] == deps["topics"]["condition"] == "service_completed_successfully"
    assert len(groups) == 1 and len(states) == 2
    assert all(s in _compose()["volumes"] for s in states)


def test_model_build_feeds_the_workers_and_recommend() -> None:
    services = _services()
    model = services["model"]
    assert model["build"]["target"] == "train" and model["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    script = _interpolate(model["command"][0])
    steps = [ln.strip().split() for ln in script.replace("\\\n", " ").splitlines() if ln.strip().startswith("clickvec ")]
    assert [s[1] for s in steps] == ["synth", "train", "export"]
    for step in steps:
        parse_cli([a.strip('"') for a in step[1:]])
    bundle = str(parse_cli([a.strip('"') for a in steps[2][1:]]).out)
    (models_vol,) = [_interpolate(v) for v in model["volumes"]]
    assert models_vol == "models:/models" and bundle == "/models/default"
    assert "/models/default/manifest.json" in script  # a present bundle is kept
    rec = parse_cli(_command("recommend"))
    assert [str(m) for m in rec.model] == [bundle] and rec.brokers == "kafka:9092"
    alerts = parse_cli(_command("alerts"))
    assert alerts.in_topic == rec.in_topic == worker_config(_command("worker-1"), {}).out_topic


@pytest.mark.parametrize("name", ["alerts", "recommend", "produce"])
def test_consumers_and_demo_traffic(name: str) -> None:
    svc = _services()[name]
    assert svc["build"]["target"] == "serve"
    assert svc["depends_on"]["worker-1"]["condition"] == "service_healthy"
    ns = parse_cli(_command(name))
    assert ns.brokers == "kafka:9092"
    if name == "produce":
        assert svc["profiles"] == ["demo"] and ns.topic == "clicks"


def test_click_topic_partitions() -> None:
    cmd = _command("topics")
    assert cmd[cmd.index("--topic") + 1] == worker_config(_command("worker-1"), {}).in_topic
    assert int(cmd[cmd.index("--partitions") + 1]) >= 2, "two workers need two partitions"


def test_references_resolve() -> None:
    """What the schema cannot see: depends_on names services, named volumes are declared, the
    build targets exist in the Dockerfile."""
    doc = _compose()
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    for name, svc in doc["services"].items():
        for dep in svc.get("depends_on", {}):
            assert dep in doc["services"], f"{name} depends on unknown {dep}"
        for vol in svc.get("volumes", []):
            source = _interpolate(vol).split(":")[0]
            if not source.startswith((".", "/", "~")):
                assert source in doc["volumes"], f"{name}: volume {source} not declared"
        if "build" in svc:
            assert f" AS {svc['build']['target']}\n" in dockerfile, f"{name}: no target {svc['build']['target']}"
