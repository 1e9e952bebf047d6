"""deploy/README.md, the production guide: every row of its sizing table is recomputed from
the benchmarks/results file it cites and must match the value shown (to the digits shown);
the state size agrees with the worker's layout and the training defaults; every metric it
names is one the worker exposes, and it names them all."""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from functools import cache
from typing import Any

from test_deploy_support import DEPLOY, REPO

GUIDE = DEPLOY / "README.md"
RESULTS = REPO / "benchmarks" / "results"
REQUIRED = ("events/s per core", "state per 1m users", "disk", "memory", "recovery of 1m users",
            "partitions")


@cache
def _result(name: str) -> Any:
    return json.loads((RESULTS / name).read_text())


def _pointer(name: str, pointer: str) -> float:
    node = _result(name)
    for part in pointer.strip("/").split("/"):
        node = node[int(part)] if isinstance(node, list) else node[part]
    assert isinstance(node, int | float) and not isinstance(node, bool), f"{name}{pointer}: {node!r}"
    return float(node)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(formula: str) -> float:
    """Arithmetic on numbers, [file.json]/json/pointer references and ceil()."""
    refs: list[float] = []

    def ref(m: re.Match[str]) -> str:
        refs.append(_pointer(m.group(1), m.group(2)))
        return f"_r{len(refs) - 1}"

    expr = re.sub(r"\[([\w.]+\.json)\](/[\w/]+)", ref, formula)

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.Name) and node.id.startswith("_r"):
            return refs[int(node.id[2:])]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "ceil":
            (arg,) = node.args
            return float(math.ceil(ev(arg)))
        raise AssertionError(f"not allowed in a derivation: {ast.dump(node)}")

    return ev(ast.parse(expr, mode="eval"))


def _sizing_rows() -> list[dict[str, str]]:
    text = GUIDE.read_text()
    section = text.split("\n## Sizing\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    header = [c.strip().lower() for c in lines[0].strip("|").split("|")]
    assert header == ["figure", "value", "source", "derivation"], header
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True)) for ln in lines[2:]]


def test_every_sizing_figure_matches_its_results_file() -> None:
    rows = _sizing_rows()
    assert len(rows) >= 10
    for row in rows:
        source = re.fullmatch(r"`benchmarks/results/([\w.]+\.json)`", row["source"])
        assert source, f"{row['figure']}: cite one results file, not {row['source']!r}"
        formula = row["derivation"].strip("`")
        cited = set(re.findall(r"\[([\w.]+\.json)\]", formula))
        assert cited == {source.group(1)}, f"{row['figure']}: derivation reads {cited}"
        m = re.match(r"([\d,]+(?:\.(\d+))?)", row["value"])
        assert m, f"{row['figure']}: no number in {row['value']!r}"
        shown = float(m.group(1).replace(",", ""))
        decimals = len(m.group(2) or "")
        computed = _evaluate(formula)
        assert abs(shown - computed) <= 0.5 * 10 ** -decimals + 1e-9, \
            f"{row['figure']}: shows {shown}, {source.group(1)} gives {computed}"
    figures = " ".join(r["figure"].lower() for r in rows)
    for needed in REQUIRED:
        assert needed in figures, f"the sizing table has no row on {needed!r}"


def test_state_size_agrees_with_worker_layout_and_training_defaults() -> None:
    from clickvec.stream.worker.state import HEADER_BYTES
    from clickvec.training.config import TrainConfig

    (row,) = [r for r in _sizing_rows() if r["figure"].startswith("State per user")]
    dims = _result("pipeline.json")["model"]["dims"]
    assert (dims["layers"], dims["hidden"]) == (TrainConfig.layers, TrainConfig.hidden), \
        "the benchmark model has the default dims"
    expected = HEADER_BYTES + 2 * TrainConfig.layers * TrainConfig.hidden * 4
    assert row["derivation"].strip("`").startswith(f"{HEADER_BYTES} + 2 * ")
    assert _evaluate(row["derivation"].strip("`")) == expected
    assert _result("pipeline_scaling.json")["state_bytes"]["f32"]["bytes_per_user"] == expected
    assert _result("recovery.json")["state_bytes_per_user"] == expected


def test_derivation_evaluator_refuses_other_code() -> None:
    for formula in ("__import__('os')", "[pipeline.json]/paced_rate ** 2", "abs(1)"):
        try:
            _evaluate(formula)
        except AssertionError:
            continue
        raise AssertionError(f"evaluated {formula!r}")


def _exposed_names() -> tuple[set[str], set[str]]:
    from clickvec.stream.worker.metrics import Metrics

    families, names = set(), set()
    suffixes = {"counter": ("_total",), "histogram": ("", "_bucket", "_sum", "_count"), "gauge": ("",)}
    for family in Metrics().registry.collect():
        families.add(family.name)
        names |= {family.name + s for s in suffixes[family.type]}
    return families, names


def test_alerting_names_the_worker_metrics() -> None:
    text = GUIDE.read_text()
    section = text.split("\n## What to alert on\n", 1)[1].split("\n## ", 1)[0]
    mentioned = set(re.findall(r"`(clickvec_\w+)`", section))
    families, names = _exposed_names()
    assert mentioned <= names, f"not exposed by the worker: {sorted(mentioned - names)}"
    covered = {f for f in families if any(m.startswith(f) for m in mentioned)}
    assert covered == families, f"not in the guide: {sorted(families - covered)}"
    assert set(re.findall(r"`(clickvec_\w+)`", text)) <= names
