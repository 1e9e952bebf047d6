"""The worker's configuration: flags > environment (CLICKVEC_*) > JSON file > defaults,
resolved into one frozen object that is printed at start-up."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from clickvec.contract.messages import DLQ_PAYLOAD_POLICIES, OUT_FORMATS
from clickvec.contract.registry import WireSettings
from clickvec.contract.topics import DEFAULT_DLQ_TOPIC, DEFAULT_IN_TOPIC, DEFAULT_OUT_TOPIC
from clickvec.kafka import KafkaConnection


@dataclass(frozen=True)
class StreamConfig:
    model: str = "models/default"
    brokers: str = "127.0.0.1:9092"
    in_topic: str = DEFAULT_IN_TOPIC
    out_topic: str = DEFAULT_OUT_TOPIC
    dlq_topic: str = DEFAULT_DLQ_TOPIC
    # "{model}" in the group is replaced by the bundle's model id (12 hex digits): each
    # model's workers then form their own group, with their own state changelog
    # (`clickvec rollout` runs a new model beside the old one this way).
    group: str = "clickvec-stream"
    state_dir: str = ".clickvec/state"
    max_batch: int = 1024
    # Seconds a batch may wait for more fetches to fill it. 0: a batch is what the
    # consumer has fetched when the previous batch is done; batches still grow with the
    # load (records arrive while a batch is applied and stored), and a partly full batch
    # no longer waits: p50 lower by 3-10 ms than with 5 ms (benchmarks/README.md, latency).
    max_wait: float = 0.0
    # How long the broker may hold a fetch with no new records. Faust builds its aiokafka
    # consumer with 1500 ms; while one such fetch is in flight, partitions that have new
    # records are not fetched either, so latency under steady load sat near 1.5 s.
    fetch_max_wait_ms: int = 20
    emit: str = "every"  # every | latest
    # Batches applied ahead of the one being stored (0: one at a time). With 1, the next
    # batch is applied while the previous one waits for its outputs' acknowledgements and
    # its states and changelog records: at a quarter of the backlog rate p50 13-18 ms
    # instead of 17-23 and p99 32-45 ms instead of 49-122, with no lower backlog rate
    # (benchmarks/README.md, latency).
    pipeline_depth: int = 1
    encoding: str = "json"  # json | f16 | i8 | avro (also --out-format; avro needs --registry)
    state_dtype: str = "f32"  # f32 | f16
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    providers: str = "auto"  # auto | cpu | cuda
    intra_op_threads: int = 1
    commit_interval: float = 1.0  # seconds between offset commits
    # A worker that died (SIGKILL, or stopped on a fatal error) holds its partitions until
    # the group's session timeout; Faust's default is 60 s.
    session_timeout: float = 15.0
    replication_factor: int = 0  # of the changelog topic; 0: min(3, brokers in the cluster)
    # Workers that keep a standby copy of each state partition (Faust's
    # table_standby_replicas): on a failover or scale-out the new owner reads only the
    # changelog records its copy lacks instead of the whole partition.
    standby_replicas: int = 0
    rocksdb_block_cache_mb: int = 64
    rocksdb_write_buffer_mb: int = 16
    # Standard Kafka client security (applied to every client the worker makes).
    security_protocol: str = ""  # "": derived, as every clickvec command does (clickvec.kafka)
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = ""
    ssl_cafile: str = ""
    # Public key file (PEM, Ed25519): refuse a model bundle unless signed by this key.
    # "": no signature needed (the file hashes still catch damage, but not forgery).
    trust: str = ""
    # Wire formats (clickvec/contract/registry.py) and what dead letters keep.
    in_format: str = "json"  # json | avro | jsonschema | protobuf (the last three: Confluent framing, --registry)
    key_mode: str = "user"  # --key: user (the user id string) | ignore (user id from the value) | registry
    registry: str = ""  # Schema Registry URL; mock://NAME is confluent-kafka's in-memory registry (tests)
    registry_auth: str = ""  # USER:PASSWORD for the registry's basic auth
    dlq_payload: str = "full"  # full: the bad message's bytes | hash: sha256 + size | none: size only

    # -- forgetting users: state TTL and the latest-vector topic (engine.py, table.py) --
    # Users idle longer than this in event time ("7d", "12h", "3600s", "500ms"; "": never)
    # are deleted from the state and the changelog, a bounded share per batch.
    state_ttl: str = ""
    state_ttl_scan: int = 1000  # stored values the TTL examines per batch (its work per batch)
    # Compacted topic (created with cleanup.policy=compact) of each user's latest vector,
    # key = user id, in the vector topic's encoding; forgotten/expired users get a
    # tombstone there. "": none.
    latest_topic: str = ""

    @property
    def state_ttl_ms(self) -> int:
        return parse_duration_ms(self.state_ttl) if self.state_ttl else 0

    def redacted(self) -> dict[str, Any]:
        out = {**asdict(self), **self.connection().redacted()}
        if self.registry_auth:
            out["registry_auth"] = "***"
        return out

    def wire(self) -> WireSettings:
        return WireSettings(self.in_format, self.key_mode, self.encoding, self.registry, self.registry_auth,
                            self.in_topic, self.out_topic)

    def connection(self) -> KafkaConnection:
        return KafkaConnection(self.brokers, self.security_protocol, self.sasl_mechanism,
                               self.sasl_username, self.sasl_password, self.ssl_cafile)

    def librdkafka(self) -> dict[str, Any]:
        """Connection settings for confluent-kafka clients."""
        return self.connection().client_config()


_FIELDS = {f.name: f for f in fields(StreamConfig)}
_DURATION_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str) -> int:
    """"7d", "12h", "30m", "3600s", "500ms" (or a bare number of seconds) -> milliseconds."""
    t = text.strip().lower()
    unit = next((u for u in ("ms", "s", "m", "h", "d") if t.endswith(u)), "")
    try:
        value = float(t[: len(t) - len(unit)] if unit else t)
    except ValueError:
        raise ValueError(f"duration {text!r}: use a number with ms, s, m, h or d, e.g. 7d or 3600s") from None
    if value <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return int(value * _DURATION_UNITS[unit or "s"])


def _coerce(name: str, value: Any) -> Any:
    typ = type(getattr(StreamConfig, name))
    return typ(value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON file with any of the settings below")
    for name, f in _FIELDS.items():
        flag = "--" + name.replace("_", "-")
        alias = {"in_topic": ["--in"], "out_topic": ["--out"], "dlq_topic": ["--dlq"],
                 "encoding": ["--out-format"], "key_mode": ["--key"]}.get(name, [])
        p.add_argument(flag, *alias, dest=name, default=None,
                       help=f"(env CLICKVEC_{name.upper()}; default {f.default!r})")


def resolve(args: argparse.Namespace | None = None, env: dict[str, str] | None = None) -> StreamConfig:
    env = dict(os.environ if env is None else env)
    values: dict[str, Any] = {}
    cfg_file = getattr(args, "config", None) if args is not None else None
    cfg_file = cfg_file or env.get("CLICKVEC_CONFIG")
    if cfg_file:
        data = json.loads(Path(cfg_file).read_text())
        unknown = set(data) - set(_FIELDS)
        if unknown:
            raise ValueError(f"unknown settings in {cfg_file}: {sorted(unknown)}")
        values.update(data)
    for name in _FIELDS:
        if f"CLICKVEC_{name.upper()}" in env:
            values[name] = env[f"CLICKVEC_{name.upper()}"]
    if args is not None:
        for name in _FIELDS:
            v = getattr(args, name, None)
            if v is not None:
                values[name] = v
    cfg = StreamConfig(**{k: _coerce(k, v) for k, v in values.items()})
    if cfg.emit not in ("every", "latest"):
        raise ValueError("emit must be 'every' or 'latest'")
    if cfg.encoding not in OUT_FORMATS:
        raise ValueError(f"encoding (--out-format) must be one of {', '.join(OUT_FORMATS)}")
    if cfg.dlq_payload not in DLQ_PAYLOAD_POLICIES:
        raise ValueError(f"dlq_payload must be one of {', '.join(DLQ_PAYLOAD_POLICIES)}")
    cfg.wire().check()  # formats, key mode, --registry, the registry extra: one line each
    if cfg.state_dtype not in ("f32", "f16"):
        raise ValueError("state_dtype must be f32 or f16")
    if cfg.state_ttl:
        parse_duration_ms(cfg.state_ttl)
    if cfg.standby_replicas < 0:
        raise ValueError("standby_replicas must be >= 0")
    if cfg.state_ttl_scan < 1:
        raise ValueError("state_ttl_scan must be >= 1")
    if cfg.latest_topic and cfg.latest_topic in (cfg.in_topic, cfg.out_topic, cfg.dlq_topic):
        raise ValueError("latest_topic must be a topic of its own (it is compacted)")
    if "{model}" in cfg.group:
        cfg = replace(cfg, group=model_group(cfg.group, cfg.model))
    return cfg


def model_group(group: str, model: str) -> str:
    """`group` with "{model}" replaced by the model id (12 hex digits) in the bundle's
    manifest at `model` (load_bundle verifies the bundle afterwards)."""
    try:
        model_id = str(json.loads((Path(model) / "manifest.json").read_text())["model_id"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"group {group!r} names the model, but {model}/manifest.json gives no model id ({e})") \
            from None
    return group.replace("{model}", model_id[:12])
