"""The bundle reader: verify every file of a bundle against its sealed manifest, then open
the chosen encoder variant as a `Bundle` with a ready step session."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clickvec.bundle.format import (
    BUNDLE_FORMAT,
    CONTENT_FILES,
    ENCODER_FILES,
    ITEM_BIAS,
    ITEM_EMBEDDINGS,
    ITEM_PROJ_BIAS,
    ITEM_PROJ_WEIGHT,
    MANIFEST,
    VOCAB,
    BundleError,
    compute_model_id,
    seal_manifest,
    sha256_bytes,
)
from clickvec.bundle.runtime import Array, RuntimeConfig, StepResult, StepSession
from clickvec.features import FeatureSpec

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------- verification


def _verified_manifest(path: Path) -> tuple[dict[str, Any], bytes]:
    """The parsed manifest and its exact bytes (what a signature covers)."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{path} is not a model bundle: {MANIFEST} is missing")
    raw = mpath.read_bytes()
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath} is not valid JSON ({e}): the bundle is damaged") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath} is not a JSON object: the bundle is damaged")
    if manifest.get("bundle_format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{mpath}: bundle_format {manifest.get('bundle_format')!r}, this clickvec reads "
            f"{BUNDLE_FORMAT}: export the model with this clickvec version"
        )
    # Sealing the manifest again gives back its exact bytes only if its digest matches
    # and it is in canonical form.
    if raw != seal_manifest(manifest):
        raise BundleError(f"{mpath} was modified after export (its digest does not match)")
    return manifest, raw


def _read_verified(path: Path, name: str, expected: dict[str, Any]) -> bytes:
    fpath = path / name
    if not fpath.is_file():
        raise BundleError(f"bundle {path} is missing {name} (listed in its manifest)")
    data = fpath.read_bytes()
    if len(data) != expected.get("bytes") or sha256_bytes(data) != expected.get("sha256"):
        raise BundleError(
            f"bundle {path}: {name} does not match its manifest sha256 (corrupt or modified file)"
        )
    return data


def _npy(data: bytes, name: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise BundleError(f"{name} is not a readable .npy array ({e})") from None


# --------------------------------------------------------------------------- bundle


class Bundle:
    """A verified model bundle with a ready step session. Build with `load_bundle`."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        variant: str,
        spec: FeatureSpec,
        arrays: dict[str, np.ndarray],
        session: StepSession,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.variant = variant
        self.spec = spec
        self.model_id: str = manifest["variants"][variant]["model_id"]
        dims = manifest["dims"]
        self.layers: int = int(dims["layers"])
        self.hidden: int = int(dims["hidden"])
        self.z_dim: int = int(dims["z_dim"])
        self.item_embeddings: np.ndarray = arrays[ITEM_EMBEDDINGS]  # (N, Ei)
        self.item_bias: np.ndarray = arrays[ITEM_BIAS]  # (N,)
        self.item_proj_weight: np.ndarray = arrays[ITEM_PROJ_WEIGHT]  # (Ei, D)
        self.item_proj_bias: np.ndarray = arrays[ITEM_PROJ_BIAS]  # (Ei,)
        self.session = session
        self.providers = session.providers

    def __repr__(self) -> str:
        return (
            f"Bundle({str(self.path)!r}, model_id={self.model_id[:12]}, variant={self.variant}, "
            f"L={self.layers}, H={self.hidden}, D={self.z_dim}, providers={self.providers})"
        )

    def zero_state(self, batch: int) -> tuple[Array, Array]:
        shape = (self.layers, batch, self.hidden)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def step(
        self, items: Array, etypes: Array, gaps: Array, lengths: Array, h: Array, c: Array
    ) -> StepResult:
        """(T, B) int64 items/etypes/gaps (padding 0 past each user's length), (B,) int32
        lengths in [1, T], (L, B, H) float32 h and c -> (h_new, c_new, z_seq (T, B, D),
        z_last (B, D), surprise (T, B)). Rows of z_seq/surprise past a user's length are
        undefined."""
        return self.session.run(items, etypes, gaps, lengths, h, c)

    def encode_offline(self, encoded_seq: Array) -> Array:
        """One user's whole sequence (n, 3) of (item, type, gap) from the zero state in
        one call -> z after each event (n, D). The offline reference for the stream."""
        seq = np.asarray(encoded_seq, dtype=np.int64)
        if seq.ndim != 2 or seq.shape[1] != 3 or seq.shape[0] < 1:
            raise ValueError(f"encoded_seq must be (n >= 1, 3), got {seq.shape}")
        h, c = self.zero_state(1)
        _, _, z_seq, _, _ = self.step(
            seq[:, 0:1], seq[:, 1:2], seq[:, 2:3], np.array([len(seq)], np.int32), h, c
        )
        return z_seq[:, 0, :]

    def item_query(self, z: Array) -> Array:
        """(..., D) -> (..., item_dim); score items with `query @ item_embeddings.T + item_bias`."""
        return np.asarray(z, np.float32) @ self.item_proj_weight.T + self.item_proj_bias

    def score_items(self, z: Array) -> Array:
        """(..., D) -> (..., n_items) next-item scores (index 0 = padding, 1 = OOV)."""
        return self.item_query(z) @ self.item_embeddings.T + self.item_bias


def verify_bundle(path: str | Path, *, trust: str | Path | None = None,
                  variant: str = "fp32") -> tuple[dict[str, Any], dict[str, bytes]]:
    """Check the bundle at `path`: its sealed manifest, with `trust` (a public key file)
    its signature by that key, every listed file's sha256 and the model ids. Returns
    the manifest and the files' bytes; raises `BundleError` on anything that does not match."""
    path = Path(path)
    manifest, raw = _verified_manifest(path)
    if trust is not None:
        # Before the files: the signature vouches for the hashes they are checked against.
        from clickvec.bundle.signing import verify_signature

        log.info("bundle %s is signed by trusted key %s", path, verify_signature(path, raw, trust))
    variants = manifest.get("variants", {})
    if variant not in variants:
        raise BundleError(
            f"bundle {path} has no {variant!r} encoder (it has {sorted(variants)}): "
            f"export it with --{variant}" if variant != "fp32" else f"bundle {path} has no fp32 encoder"
        )
    files: dict[str, dict[str, Any]] = manifest.get("files", {})
    needed = [ENCODER_FILES[v] for v in variants] + list(CONTENT_FILES)
    for name in needed:
        if name not in files:
            raise BundleError(f"bundle {path}: manifest lists no sha256 for {name}; re-export it")
    # Every listed file is checked, also the variants we do not run: a bundle is whole or refused.
    for name in files:
        if Path(name).name != name or name in (MANIFEST, "", ".", ".."):
            raise BundleError(f"bundle {path}: manifest lists a file outside the bundle ({name!r})")
    data = {name: _read_verified(path, name, meta) for name, meta in files.items()}
    hashes = {name: meta["sha256"] for name, meta in files.items()}
    for v in variants:
        if compute_model_id(hashes, ENCODER_FILES[v]) != variants[v].get("model_id"):
            raise BundleError(f"bundle {path}: the {v} model id does not match its content; re-export it")
    if manifest.get("model_id") != variants["fp32"]["model_id"]:
        raise BundleError(f"bundle {path}: model_id does not match its content; re-export it")
    return manifest, data


def load_bundle(
    path: str | Path,
    providers: str | Sequence[str] = "auto",
    *,
    variant: str = "fp32",
    intra_op_threads: int = 0,
    allow_spinning: bool = True,
    io_binding: bool | None = None,
    warmup: bool = True,
    trust: str | Path | None = None,
) -> Bundle:
    """Verify every file of the bundle at `path` against its manifest (`verify_bundle`;
    with `trust`, a public key file, also its signature by that key), then open the
    chosen encoder variant. Raises `BundleError` on anything that does not match."""
    path = Path(path)
    manifest, data = verify_bundle(path, trust=trust, variant=variant)
    try:
        spec = FeatureSpec.from_json(json.loads(data[VOCAB]))
    except (ValueError, TypeError, AttributeError) as e:
        raise BundleError(f"bundle {path}: {VOCAB} is unusable ({e})") from None
    arrays = {name: _npy(data[name], name) for name in CONTENT_FILES if name.endswith(".npy")}

    prov: str | tuple[str, ...] = providers if isinstance(providers, str) else tuple(providers)
    cfg = RuntimeConfig(prov, intra_op_threads, allow_spinning, io_binding, warmup)
    session = StepSession(data[ENCODER_FILES[variant]], cfg)
    bundle = Bundle(path, manifest, variant, spec, arrays, session)
    _check_dims(bundle)
    log.info(
        "loaded bundle %s model_id=%s variant=%s on %s (intra_op_threads=%s, io_binding=%s)",
        path, bundle.model_id[:12], variant, session.providers[0], intra_op_threads or "auto",
        session.io_binding,
    )
    if warmup:
        # First run allocates arenas and picks kernels; keep that off the first real batch.
        h, c = bundle.zero_state(2)
        ones = np.ones((2, 2), np.int64)
        bundle.step(ones, ones, ones, np.array([2, 1], np.int32), h, c)
    return bundle


def _check_dims(b: Bundle) -> None:
    d = b.manifest["dims"]
    problems: list[str] = []
    if (b.session.layers, b.session.hidden) != (b.layers, b.hidden):
        problems.append(f"graph state is (L={b.session.layers}, H={b.session.hidden})")
    if b.item_embeddings.shape != (d["n_items"], d["item_dim"]):
        problems.append(f"item_embeddings is {b.item_embeddings.shape}")
    if b.spec.n_items != d["n_items"] or b.spec.n_event_types != d["n_event_types"]:
        problems.append("vocab sizes differ from dims")
    if b.item_proj_weight.shape != (d["item_dim"], d["z_dim"]):
        problems.append(f"item_proj_weight is {b.item_proj_weight.shape}")
    if problems:
        raise BundleError(f"bundle {b.path} is inconsistent with its manifest dims {d}: {'; '.join(problems)}")


def bundle_files(path: str | Path) -> Iterable[Path]:
    """Every file the manifest of the bundle at `path` covers, the manifest included."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_bytes())
    yield path / MANIFEST
    for name in manifest.get("files", {}):
        yield path / name

