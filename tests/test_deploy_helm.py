"""deploy/helm/clickvec: `helm lint` clean; `helm template` with GPU on and off, KEDA on and
off and with SASL/TLS renders objects that kubernetes-validate accepts (strict; KEDA's
ScaledObject and TriggerAuthentication and the ServiceMonitor against their vendored CRD
schemas, strict); the worker is a StatefulSet whose flags and CLICKVEC_* environment the real
worker resolves to what the pod needs; replicas never exceed the input partitions."""

from __future__ import annotations

import subprocess
from functools import cache
from typing import Any

import pytest
from test_deploy_support import (
    DEPLOY,
    TOOLS_HINT,
    find_tool,
    load_schema,
    load_yaml_all,
    need_module,
    parse_cli,
    schema_errors,
    strict_crd_schema,
    worker_config,
    worker_fields,
)

CHART = DEPLOY / "helm" / "clickvec"
KUBE_VERSIONS = ("1.30", "1.37")  # an older cluster still in use; the newest schemas kubernetes-validate 1.37 ships
CRD_SCHEMAS = {"ScaledObject": "keda-scaledobject.json", "TriggerAuthentication": "keda-triggerauthentication.json",
               "ServiceMonitor": "servicemonitor.json"}
SECURE = {"kafka.securityProtocol": "SASL_SSL", "kafka.sasl.mechanism": "SCRAM-SHA-512",
          "kafka.sasl.username": "clickvec", "kafka.sasl.passwordSecret.name": "kafka-sasl",
          "kafka.tls.caSecret.name": "kafka-ca"}
VARIANTS: dict[str, dict[str, str]] = {
    "cpu": {},
    "gpu": {"gpu.enabled": "true"},
    "cpu-keda": {"keda.enabled": "true"},
    "gpu-keda": {"gpu.enabled": "true", "keda.enabled": "true", "keda.maxReplicas": "3"},
    "secure-keda-monitor": {**SECURE, "keda.enabled": "true", "metrics.serviceMonitor.enabled": "true",
                            "worker.standbyReplicas": "1", "worker.settings.state_dtype": "f16"},
}


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([find_tool("helm"), *args], capture_output=True, text=True, timeout=180)


def _set_args(values: dict[str, str]) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


@cache
def _render_cached(items: tuple[tuple[str, str], ...]) -> tuple[int, str, str]:
    r = _helm("template", "cv", str(CHART), "--namespace", "clickvec", *_set_args(dict(items)))
    return r.returncode, r.stdout, r.stderr


def _render(values: dict[str, str]) -> list[dict[str, Any]]:
    rc, out, err = _render_cached(tuple(sorted(values.items())))
    assert rc == 0, f"helm template failed: {err.strip()}"
    return load_yaml_all(out)


def _one(objs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    (obj,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    return obj


def test_helm_is_installed() -> None:
    r = _helm("version")
    assert r.returncode == 0, f"helm version failed ({r.stderr.strip()}): {TOOLS_HINT}"


@pytest.mark.parametrize("variant", ["cpu", "gpu-keda", "secure-keda-monitor"])
def test_helm_lint(variant: str) -> None:
    r = _helm("lint", "--strict", str(CHART), *_set_args(VARIANTS[variant]))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_objects_are_valid(variant: str) -> None:
    kv = need_module("kubernetes_validate")
    objs = _render(VARIANTS[variant])
    kinds = sorted(o["kind"] for o in objs)
    assert {"StatefulSet", "Service", "PodDisruptionBudget", "ServiceAccount"} <= set(kinds)
    assert kinds.count("Deployment") == 2
    assert ("ScaledObject" in kinds) == (VARIANTS[variant].get("keda.enabled") == "true")
    for obj in objs:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in CRD_SCHEMAS:
            schema = load_schema(CRD_SCHEMAS[obj["kind"]])
            crd = schema["x-clickvec-crd"]
            assert (obj["apiVersion"], obj["kind"]) == (f"{crd['group']}/{crd['version']}", crd["kind"]), where
            assert schema_errors(strict_crd_schema(schema), obj) == [], where
            continue
        for version in KUBE_VERSIONS:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{where} (Kubernetes {version}): {e.message} at {list(e.path)}")


def test_kubernetes_validate_catches_errors() -> None:
    kv = need_module("kubernetes_validate")
    sts = _one(_render({}), "StatefulSet")
    sts["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(sts, KUBE_VERSIONS[-1], strict=True)
    sts = _one(_render({}), "StatefulSet")
    sts["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(sts, KUBE_VERSIONS[-1], strict=True)


def _container_env(container: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    plain = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    refs = {e["name"]: e["valueFrom"] for e in container.get("env", []) if "valueFrom" in e}
    return plain, refs


def _labels_select(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_worker_statefulset(variant: str) -> None:
    values = VARIANTS[variant]
    gpu, keda = values.get("gpu.enabled") == "true", values.get("keda.enabled") == "true"
    objs = _render(values)
    sts = _one(objs, "StatefulSet", "-worker")
    pod = sts["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    plain, refs = _container_env(c)
    cfg = worker_config(c["args"], {**plain, **{k: "from-secret" for k in refs}})
    assert cfg.web_host == "0.0.0.0"
    assert cfg.providers == ("cuda" if gpu else "cpu")
    assert c["image"].endswith(":cuda" if gpu else ":serve")
    assert ("nvidia.com/gpu" in c["resources"]["limits"]) == gpu
    assert ("replicas" in sts["spec"]) == (not keda)
    # state on the per-replica volume
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert cfg.state_dir.startswith(mount["mountPath"].rstrip("/") + "/")
    (model_mount,) = [m for m in c["volumeMounts"] if m["name"] == "model"]
    assert cfg.model.startswith(model_mount["mountPath"] + "/") and model_mount["readOnly"]
    # probes and scraping on the web port
    (port,) = c["ports"]
    assert port["containerPort"] == cfg.web_port
    assert c["livenessProbe"]["httpGet"]["path"] == c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    notes = pod["metadata"]["annotations"]
    assert (notes["prometheus.io/scrape"], notes["prometheus.io/port"]) == ("true", str(cfg.web_port))
    # settings: each CLICKVEC_* is a worker setting; the standby count is passed through
    unknown = {k for k in {**plain, **refs} if k.startswith("CLICKVEC_")} - {
        f"CLICKVEC_{f.upper()}" for f in worker_fields()}
    assert unknown <= {"CLICKVEC_STANDBY_REPLICAS"}, unknown
    assert ("CLICKVEC_STANDBY_REPLICAS" in plain) == ("worker.standbyReplicas" in values)
    assert cfg.standby_replicas == int(values.get("worker.standbyReplicas", 0))
    # disruption budget and the headless service select these pods
    pdb = _one(objs, "PodDisruptionBudget", "-worker")
    assert _labels_select(pdb["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    svc = _one(objs, "Service", "-worker")
    assert svc["metadata"]["name"] == sts["spec"]["serviceName"]
    assert _labels_select(svc["spec"]["selector"], pod["metadata"]["labels"])
    if keda:
        so = _one(objs, "ScaledObject")
        assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                                "name": sts["metadata"]["name"]}
        assert so["spec"]["maxReplicaCount"] <= 4  # values.yaml input.partitions
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "kafka"
        meta = trigger["metadata"]
        assert (meta["consumerGroup"], meta["topic"], meta["bootstrapServers"]) == \
            (cfg.group, cfg.in_topic, cfg.brokers)


def test_secure_settings_come_from_secrets() -> None:
    objs = _render(VARIANTS["secure-keda-monitor"])
    sts = _one(objs, "StatefulSet", "-worker")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    plain, refs = _container_env(c)
    cfg = worker_config(c["args"], {**plain, "CLICKVEC_SASL_PASSWORD": "s3cret"})
    assert (cfg.security_protocol, cfg.sasl_mechanism, cfg.sasl_username) == ("SASL_SSL", "SCRAM-SHA-512", "clickvec")
    assert cfg.state_dtype == "f16" and plain["CLICKVEC_STANDBY_REPLICAS"] == "1"
    assert refs["CLICKVEC_SASL_PASSWORD"] == {"secretKeyRef": {"name": "kafka-sasl", "key": "password"}}
    assert "s3cret" not in str(c["args"])
    (ca_mount,) = [m for m in c["volumeMounts"] if m["name"] == "kafka-ca"]
    assert cfg.ssl_cafile.startswith(ca_mount["mountPath"] + "/")
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["kafka-ca"]["secret"]["secretName"] == "kafka-ca"
    for name in ("alerts", "recommend"):
        dep = _one(objs, "Deployment", f"-{name}")
        (cc,) = dep["spec"]["template"]["spec"]["containers"]
        ns = parse_cli(cc["args"])
        assert (ns.security_protocol, ns.sasl_mechanism, ns.sasl_username, ns.ssl_cafile) == \
            ("SASL_SSL", "SCRAM-SHA-512", "clickvec", cfg.ssl_cafile)
        assert _container_env(cc)[1]["CLICKVEC_SASL_PASSWORD"] == refs["CLICKVEC_SASL_PASSWORD"]
    auth = _one(objs, "TriggerAuthentication")
    so = _one(objs, "ScaledObject")
    assert so["spec"]["triggers"][0]["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert so["spec"]["triggers"][0]["metadata"]["sasl"] == "scram_sha512"
    assert so["spec"]["triggers"][0]["metadata"]["tls"] == "enable"
    params = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert params["password"]["name"] == "kafka-sasl" and params["ca"]["name"] == "kafka-ca"
    monitor = _one(objs, "ServiceMonitor")
    svc = _one(objs, "Service", "-worker")
    assert monitor["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert _labels_select(monitor["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])


def test_consumers_read_the_worker_output() -> None:
    objs = _render({})
    sts = _one(objs, "StatefulSet", "-worker")
    (wc,) = sts["spec"]["template"]["spec"]["containers"]
    cfg = worker_config(wc["args"], _container_env(wc)[0])
    for name in ("alerts", "recommend"):
        dep = _one(objs, "Deployment", f"-{name}")
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        assert c["args"][0] == name
        ns = parse_cli(c["args"])
        assert ns.in_topic == cfg.out_topic and ns.brokers == cfg.brokers
        if name == "recommend":
            assert [str(m) for m in ns.model] == [cfg.model]


@pytest.mark.parametrize(("values", "message"), [
    ({"keda.enabled": "true", "keda.maxReplicas": "5"}, "keda.maxReplicas (5) exceeds input.partitions (4)"),
    ({"keda.enabled": "true", "input.partitions": "2", "keda.minReplicas": "3"}, "exceeds"),
    ({"worker.replicas": "5"}, "worker.replicas (5) exceeds input.partitions (4)"),
    ({"kafka.sasl.username": "u"}, "the password comes from a Secret"),
])
def test_refused_values(values: dict[str, str], message: str) -> None:
    rc, _, err = _render_cached(tuple(sorted(values.items())))
    assert rc != 0 and message in err, err


def test_keda_max_defaults_to_the_partitions() -> None:
    so = _one(_render({"keda.enabled": "true", "input.partitions": "6"}), "ScaledObject")
    assert so["spec"]["maxReplicaCount"] == 6
