"""The installed package: one top-level import name, every subcommand answers, and the
layout rules of the source tree (file and function size, private library access in one
module) hold."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("clickvec", "stream", "export", "training")
SUBCOMMANDS = ("broker", "synth", "produce", "train", "export", "stream", "alerts", "recommend", "run")
# Straight-line graph construction reads best as one function (see its docstring).
LONG_FUNCTION_ALLOWED = {("export/graph.py", "build_step_graph")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools would reuse (and leave) a build/ folder in the checkout.
    src = tmp_path_factory.mktemp("src") / "clickvec"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".clickvec", "runs", "models", "data"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True, timeout=300,
    )
    (whl,) = out.glob("clickvec-*.whl")
    return whl


def test_wheel_has_one_top_level_name(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert z.read(top_level).decode().split() == ["clickvec"]
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"clickvec"}
    for module in ("clickvec/stream/worker/app.py", "clickvec/training/model.py", "clickvec/export/writer.py",
                   "clickvec/training/recipes/", "clickvec/devtools/kafka/pom.xml",
                   "clickvec/devtools/kafka/log4j2.properties"):
        assert any(n.startswith(module) for n in names), module


def test_installed_wheel_answers_and_has_no_bare_stage_names(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    for bare in ("stream", "export", "training"):
        r = subprocess.run([sys.executable, "-c", f"import {bare}"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, bare
    r = subprocess.run([sys.executable, "-c", "import clickvec.stream.worker.app, clickvec.cli; "
                        "print(clickvec.cli.__file__)"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(target)), r.stdout
    for cmd in SUBCOMMANDS:
        r = subprocess.run([sys.executable, "-m", "clickvec.cli", cmd, "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"clickvec {cmd} --help: {r.stderr[-2000:]}"
        assert "usage" in r.stdout.lower(), cmd


def _sources() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py"))


def test_no_file_over_500_lines_no_function_over_80() -> None:
    problems = []
    for path in _sources():
        rel = path.relative_to(REPO).as_posix()
        text = path.read_text()
        if text.count("\n") > 500:
            problems.append(f"{rel}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 80 and (rel, node.name) not in LONG_FUNCTION_ALLOWED:
                    problems.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert not problems, "\n".join(problems)


def test_lint_one_import_name_and_private_access_in_one_module() -> None:
    """ruff's TID251 bans bare `stream` / `export` / `training` imports, and SLF001 bans
    private attribute access everywhere but stream/worker/faust_internals.py."""
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "SLF001,TID251", "--output-format",
                        "concise", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
