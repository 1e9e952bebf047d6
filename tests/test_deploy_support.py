"""Helpers shared by the deploy tests (tests/test_deploy_*.py): the tools they run, the
real CLI parsers that the images, the compose file and the chart hand their flags to, and
the vendored schemas. Tools that are missing fail the tests; they never skip them."""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SCHEMAS = DEPLOY / "schemas"
TOOLS_HINT = "run `bash deploy/tools.sh` (installs hadolint, kubernetes-validate, jsonschema, helm)"


def find_tool(name: str) -> str:
    """The tool next to this Python (the venv's bin), in ~/.cache/clickvec/bin, or on PATH."""
    for d in (Path(sys.executable).parent, Path.home() / ".cache" / "clickvec" / "bin"):
        if (d / name).is_file() and os.access(d / name, os.X_OK):
            return str(d / name)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: {TOOLS_HINT}", pytrace=False)
    return found


def need_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.fail(f"Python module {name} missing: {TOOLS_HINT}", pytrace=False)


def load_yaml_all(text: str) -> list[Any]:
    yaml = need_module("yaml")
    return [d for d in yaml.safe_load_all(text) if d is not None]


class _Parsed(Exception):
    def __init__(self, ns: argparse.Namespace) -> None:
        self.ns = ns


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """Parse `clickvec ARGV` with the subcommand's own parser and stop there: a flag the
    command does not take fails the test with argparse's message."""
    from clickvec.cli import SUBCOMMANDS

    cmd, rest = argv[0], [str(a) for a in argv[1:]]
    assert cmd in SUBCOMMANDS, f"clickvec has no subcommand {cmd!r}"
    module = importlib.import_module(SUBCOMMANDS[cmd][0])
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        raise _Parsed(real(self, args, namespace))

    err = io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop), \
            contextlib.redirect_stderr(err):
        try:
            module.main(rest)
        except _Parsed as parsed:
            return parsed.ns
        except SystemExit as e:
            pytest.fail(f"clickvec {cmd} {' '.join(rest)}: exit {e.code}: {err.getvalue().strip()}")
    pytest.fail(f"clickvec {cmd} returned without parsing its arguments")


def worker_config(argv: list[str], env: dict[str, str]) -> Any:
    """The worker's resolved StreamConfig for `clickvec stream ARGV` under ENV (flags > env)."""
    from clickvec.stream.worker import config

    assert argv[0] == "stream", argv
    return config.resolve(parse_cli(argv), env=env)


def worker_fields() -> set[str]:
    from dataclasses import fields

    from clickvec.stream.worker.config import StreamConfig

    return {f.name for f in fields(StreamConfig)}


def load_schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text())


def strict_crd_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's openAPIV3Schema with additionalProperties: false wherever an object lists its
    properties and does not keep unknown fields: a misspelt field fails, as under
    `kubectl apply`'s strict field validation."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    # The API server checks apiVersion/kind/metadata itself; the CRD schema lists them loosely.
    schema.setdefault("properties", {}).setdefault("metadata", {"type": "object"})
    return schema


def schema_errors(schema: dict[str, Any], doc: Any) -> list[str]:
    jsonschema = need_module("jsonschema")
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def test_cli_parser_helper_rejects_unknown_flags() -> None:
    assert parse_cli(["alerts", "--brokers", "k:9092", "--group", "g"]).group == "g"
    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments: --no-such-flag"):
        parse_cli(["alerts", "--no-such-flag"])


def test_strict_crd_schema_rejects_misspelt_fields() -> None:
    schema = strict_crd_schema(load_schema("keda-scaledobject.json"))
    ok = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "w"},
          "spec": {"scaleTargetRef": {"name": "w"}, "maxReplicaCount": 4,
                   "triggers": [{"type": "kafka", "metadata": {"topic": "clicks"}}]}}
    assert schema_errors(schema, ok) == []
    bad = copy.deepcopy(ok)
    bad["spec"]["maxReplicas"] = 4
    assert any("maxReplicas" in e for e in schema_errors(schema, bad))
