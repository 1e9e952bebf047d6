"""The container images (deploy/docker/Dockerfile): hadolint clean, three targets from
python:3.11-slim, multi-stage, non-root, no pip cache; each installs the extras it is for;
the build context (.dockerignore) carries exactly what `pip install .` reads."""

from __future__ import annotations

import re
import subprocess
import tomllib

from test_deploy_support import DEPLOY, REPO, find_tool, worker_config

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"


def _stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)(?: AS (\S+))?", rest.strip(), flags=re.IGNORECASE)
            assert m and m.group(2), f"every stage is named: {line}"
            current = [("FROM", m.group(1))]
            stages[m.group(2)] = current
        else:
            current.append((keyword, rest.strip()))
    return stages


def _chain(stages: dict[str, list[tuple[str, str]]], name: str) -> list[tuple[str, str]]:
    """A stage's instructions with those of the stages it is built FROM, base first."""
    base = stages[name][0][1]
    return (_chain(stages, base) if base in stages else []) + stages[name]


def test_hadolint_clean_and_effective(tmp_path) -> None:
    hadolint = find_tool("hadolint")
    r = subprocess.run([hadolint, "--failure-threshold", "style", str(DOCKERFILE)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\n")
    r = subprocess.run([hadolint, str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "DL3007" in r.stdout and "DL3042" in r.stdout, r.stdout


def test_targets_slim_base_non_root_and_multi_stage() -> None:
    stages = _stages()
    default_args = dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE))
    assert default_args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert list(stages)[-1] == "serve", "serve is the default (last) target"
    for target in ("serve", "cuda", "train"):
        chain = _chain(stages, target)
        assert chain[0] == ("FROM", "${PYTHON_IMAGE}")
        assert [k for k, _ in stages[target]].count("COPY") >= 1
        (copy_from,) = [a for k, a in stages[target] if k == "COPY"][:1]
        assert copy_from.startswith(f"--from=build-{target} /opt/clickvec"), copy_from
        users = [a for k, a in chain if k == "USER"]
        assert users and users[-1].split(":")[0] not in ("0", "root"), f"{target} runs as {users}"
        assert [a for k, a in chain if k == "ENTRYPOINT"] == ['["clickvec"]']
        # nothing of the source tree or the build tools reaches the runtime stage
        assert not any(k == "COPY" and "--from" not in a for k, a in chain), target
    for target in ("serve", "cuda"):
        assert ("EXPOSE", "6066") in stages[target]
        env = " ".join(a for k, a in _chain(stages, target) if k == "ENV")
        assert "CLICKVEC_WEB_HOST=0.0.0.0" in env and "CLICKVEC_STATE_DIR=/var/lib/clickvec/state" in env


def test_each_image_installs_its_extra_without_cache() -> None:
    stages = _stages()
    installs = {name: " ".join(a for k, a in stages[name] if k == "RUN") for name in stages}
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", installs["build-serve"]), "serve: base install only"
    assert '".[gpu]"' in installs["build-cuda"] and "ldconfig" in installs["cuda"]
    assert '".[train]"' in installs["build-train"]
    for name, cmd in installs.items():
        for pip in re.findall(r"pip install[^&]*", cmd):
            assert "--no-cache-dir" in pip, f"{name}: {pip}"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "torch" not in " ".join(extras["gpu"]) and any(d.startswith("torch") for d in extras["train"])
    assert any(d.startswith("onnxruntime-gpu[cuda,cudnn]") for d in extras["gpu"])


def test_build_context_is_what_pip_install_reads() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "deny everything first"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = set()
    for keyword, args in _stages()["source"]:
        if keyword == "COPY":
            copied |= {a.rstrip("/") for a in args.split()[:-1]}
    assert copied == allowed
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs | {"pyproject.toml", pyproject["project"]["readme"]} == copied, \
        "copy every folder of [tool.setuptools] package-dir, the readme and pyproject.toml"
    for path in copied:
        assert (REPO / path).exists(), path


def _image_env(target: str) -> dict[str, str]:
    env = " ".join(a for k, a in _chain(_stages(), target) if k == "ENV")
    return {k: v for k, v in re.findall(r"(\w+)=(\S+)", env) if k.startswith("CLICKVEC_")}


def test_image_environment_configures_the_worker() -> None:
    """`docker run clickvec:serve` (CMD stream) gives a worker that listens on all interfaces and
    keeps its state on the volume; the cuda image insists on the CUDA provider."""
    cfg = worker_config(["stream"], _image_env("serve"))
    assert (cfg.web_host, cfg.web_port, cfg.state_dir, cfg.model, cfg.providers) == \
        ("0.0.0.0", 6066, "/var/lib/clickvec/state", "/models/default", "auto")
    assert worker_config(["stream"], _image_env("cuda")).providers == "cuda"
    cmds = {t: [a for k, a in _stages()[t] if k == "CMD"] for t in ("serve", "cuda", "train")}
    assert cmds == {"serve": ['["stream"]'], "cuda": ['["stream"]'], "train": ['["train", "--help"]']}
