"""Signed bundles (clickvec/bundle/signing.py): a bundle signed at export is accepted by
its public key; with a trusted key, unsigned bundles, bundles signed by another key and
forged bundles (weights changed, every hash and the manifest seal redone) are refused in
one line. The tiny model comes from test_export.py's fixtures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_export import run_dir, spec  # noqa: F401 - fixtures: a tiny model's training run

from clickvec.bundle.format import (
    ENCODER_FILES,
    ITEM_BIAS,
    MANIFEST,
    BundleError,
    compute_model_id,
    seal_manifest,
    sha256_file,
)
from clickvec.bundle.reader import load_bundle
from clickvec.bundle.signing import SIGNATURE, generate_keys
from clickvec.bundle.signing import main as signing_main
from clickvec.export import cli as export_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, run_dir: Path, keys: tuple[Path, Path]) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("signed") / "m"
    assert export_cli.main([str(run_dir), "--out", str(out), "--sign", str(keys[0])]) == 0
    return out


def _copy(src: Path, dst: Path, without: str = "") -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(without) if without else None)
    return dst


def _refused(bundle: Path, trust: Path) -> str:
    with pytest.raises(BundleError) as e:
        load_bundle(bundle, providers="cpu", warmup=False, trust=trust)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_export_keygen_writes_a_pair_and_never_overwrites(tmp_path: Path) -> None:
    assert export_cli.main(["keygen", "--out", str(tmp_path / "k")]) == 0
    assert (tmp_path / "k" / "clickvec-signing.key").stat().st_mode & 0o077 == 0  # owner only
    assert (tmp_path / "k" / "clickvec-signing.pub").is_file()
    assert export_cli.main(["keygen", "--out", str(tmp_path / "k")]) == 1


def test_signed_bundle_is_accepted_by_its_key(signed: Path, keys: tuple[Path, Path]) -> None:
    rec = json.loads((signed / SIGNATURE).read_text())
    assert rec["algorithm"] == "ed25519" and rec["manifest_sha256"] == sha256_file(signed / MANIFEST)
    b = load_bundle(signed, providers="cpu", warmup=False, trust=keys[1])
    assert b.model_id == json.loads((signed / MANIFEST).read_text())["model_id"]
    assert signing_main(["verify", str(signed), "--trust", str(keys[1])]) == 0
    # Without --trust the signature is not needed, and nothing about an unsigned load changed.
    load_bundle(_copy(signed, signed.parent / "plain", SIGNATURE), providers="cpu", warmup=False)


def test_unsigned_bundle_is_refused_with_trust(signed: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    assert "is not signed" in _refused(_copy(signed, tmp_path / "m", SIGNATURE), keys[1])


def test_wrong_key_is_refused(signed: Path, tmp_path: Path) -> None:
    _, other_pub = generate_keys(tmp_path / "other")
    assert "not by the trusted key" in _refused(signed, other_pub)


def _forge(bundle: Path) -> None:
    """What an attacker without the private key can do: change the weights and redo every
    hash, the model ids and the manifest's seal, keeping the old signature.json."""
    bias = np.load(bundle / ITEM_BIAS)
    np.save(bundle / ITEM_BIAS, (bias + 5.0).astype(bias.dtype))
    m = json.loads((bundle / MANIFEST).read_text())
    m["files"][ITEM_BIAS] = {"sha256": sha256_file(bundle / ITEM_BIAS), "bytes": (bundle / ITEM_BIAS).stat().st_size}
    hashes = {k: v["sha256"] for k, v in m["files"].items()}
    for v, meta in m["variants"].items():
        meta["model_id"] = compute_model_id(hashes, ENCODER_FILES[v])
    m["model_id"] = m["variants"]["fp32"]["model_id"]
    (bundle / MANIFEST).write_bytes(seal_manifest(m))


def test_forged_bundle_is_refused(signed: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    forged = _copy(signed, tmp_path / "m")
    _forge(forged)
    load_bundle(forged, providers="cpu", warmup=False)  # the hashes alone cannot tell
    assert "signature does not match" in _refused(forged, keys[1])


def test_stream_with_trust_refuses_an_unsigned_bundle_before_connecting(
    signed: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    unsigned = _copy(signed, tmp_path / "m", SIGNATURE)
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "clickvec.cli", "stream", "--model", str(unsigned), "--trust", str(keys[1]),
         "--brokers", "127.0.0.1:1", "--state-dir", str(tmp_path / "state")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    assert r.returncode != 0 and elapsed < 30, (r.returncode, elapsed)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not signed" in lines[0], r.stderr


def test_recommend_with_trust_refuses_unsigned_and_forged_bundles_before_connecting(
    signed: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """`clickvec recommend --trust` checks like `stream --trust`, before any connection. A
    missing CA file stands for "no connection made": it is checked first thing in the
    connection check, so the signed bundle's run ends on it, past the bundle."""
    forged = _copy(signed, tmp_path / "forged")
    _forge(forged)
    cases = {"unsigned": (_copy(signed, tmp_path / "unsigned", SIGNATURE), "is not signed"),
             "forged": (forged, "signature does not match"),
             "signed": (signed, "missing-ca.pem")}
    t0 = time.monotonic()
    procs = {name: subprocess.Popen(  # at once: three interpreter start-ups in the time of one
        [sys.executable, "-m", "clickvec.cli", "recommend", "--model", str(bundle), "--trust", str(keys[1]),
         "--brokers", "127.0.0.1:1", "--ssl-cafile", str(tmp_path / "missing-ca.pem")],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    ) for name, (bundle, _) in cases.items()}  # fmt: skip
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and elapsed < 10, (name, proc.returncode, elapsed, err)
        assert len(lines) == 1 and cases[name][1] in lines[0], (name, err)
