"""Model bundle loader: verify a bundle written by `clickvec export`, then run its step graph.

Imports numpy, onnxruntime and clickvec only — never torch — because the stream worker
(and its serving image) uses it.

A bundle directory holds:
  manifest.json           format version, model id, dims, feature spec, names, metrics,
                          parity figures, sha256 of every file, and its own digest
  encoder.onnx            the step graph (float32); optional encoder.fp16.onnx / encoder.int8.onnx
  vocab.json              FeatureSpec.to_json()
  item_embeddings.npy     float32 (n_items, item_dim)   \
  item_bias.npy           float32 (n_items,)             } score = (W z + b) . emb + bias
  item_proj_weight.npy    float32 (item_dim, z_dim) W    /
  item_proj_bias.npy      float32 (item_dim,)       b   /

Usage:
    bundle = load_bundle("models/NAME")          # verifies, picks CUDA or CPU, warms up
    h, c = bundle.zero_state(B)
    h, c, z_seq, z_last, surprise = bundle.step(items, etypes, gaps, lengths, h, c)
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from clickvec.contract import (
    IN_C,
    IN_ETYPE,
    IN_GAP,
    IN_H,
    IN_ITEM,
    IN_LENGTHS,
    STEP_INPUTS,
    STEP_OUTPUTS,
    ClickvecError,
)
from clickvec.features import FeatureSpec

log = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
VOCAB = "vocab.json"
ITEM_EMBEDDINGS = "item_embeddings.npy"
ITEM_BIAS = "item_bias.npy"
ITEM_PROJ_WEIGHT = "item_proj_weight.npy"
ITEM_PROJ_BIAS = "item_proj_bias.npy"
ENCODER_FILES = {"fp32": "encoder.onnx", "fp16": "encoder.fp16.onnx", "int8": "encoder.int8.onnx"}
# Everything besides the encoder that defines what a vector means.
CONTENT_FILES = (VOCAB, ITEM_EMBEDDINGS, ITEM_BIAS, ITEM_PROJ_WEIGHT, ITEM_PROJ_BIAS)
DIGEST_KEY = "manifest_sha256"

Array = np.ndarray
StepResult = tuple[Array, Array, Array, Array, Array]


class BundleError(ClickvecError):
    """A model bundle that cannot be trusted or used (missing file, hash mismatch, wrong
    format). Action: re-export it with `clickvec export runs/NAME --out models/NAME`, or
    copy the whole bundle directory again; never edit files inside a bundle by hand."""


# ------------------------------------------------------------- hashing (shared with export)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def compute_model_id(file_hashes: dict[str, str], encoder_file: str) -> str:
    """Content hash of one runnable model: its encoder graph plus vocabulary and item
    tables. Same bytes -> same id, whoever exports them and whenever."""
    h = hashlib.sha256(b"clickvec-bundle-1\n")
    h.update(f"encoder\0{file_hashes[encoder_file]}\n".encode())
    for name in CONTENT_FILES:
        h.update(f"{name}\0{file_hashes[name]}\n".encode())
    return h.hexdigest()


def canonical_json(obj: Any) -> bytes:
    """The one byte form of a manifest: any edit to the file changes its parse or its form."""
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False) + "\n").encode()


def seal_manifest(manifest: dict[str, Any]) -> bytes:
    """Add the manifest's own digest (over its canonical form without it); return the bytes."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return canonical_json({**body, DIGEST_KEY: sha256_bytes(canonical_json(body))})


def _verified_manifest(path: Path) -> dict[str, Any]:
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
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    if manifest.get(DIGEST_KEY) != sha256_bytes(canonical_json(body)) or raw != canonical_json(manifest):
        raise BundleError(f"{mpath} was modified after export (its digest does not match)")
    return manifest


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
    import io

    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise BundleError(f"{name} is not a readable .npy array ({e})") from None


# -------------------------------------------------------------------------- session


@dataclass(frozen=True)
class RuntimeConfig:
    """How the step graph runs. `providers`: "auto" (CUDA when it initialises, else CPU),
    "cpu", "cuda", or an explicit ORT provider list. `intra_op_threads` 0 = ORT default
    (one per physical core). `allow_spinning` False frees the cores between calls, for
    workers that share them with a Kafka client."""

    providers: str | tuple[str, ...] = "auto"
    intra_op_threads: int = 0
    allow_spinning: bool = True
    io_binding: bool | None = None  # None: on for CUDA, off for CPU
    warmup: bool = True


def _session_options(cfg: RuntimeConfig, quiet: bool = False) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one chain of ops: inter-op threads idle
    so.inter_op_num_threads = 1
    so.intra_op_num_threads = max(0, int(cfg.intra_op_threads))
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if cfg.allow_spinning else "0")
    if quiet:
        so.log_severity_level = 4  # a CUDA EP that fails to start is expected on CPU hosts
    return so


_cuda_failure: str | None = None  # why CUDA did not start in this process; not retried under "auto"


def _nvidia_device_present() -> bool:
    """Cheap check before asking ORT for CUDA, which logs a loud error when it cannot."""
    import os

    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


def _make_session(model: bytes, cfg: RuntimeConfig) -> ort.InferenceSession:
    global _cuda_failure
    want = cfg.providers
    available = ort.get_available_providers()
    if isinstance(want, str):
        want = want.lower()
        if want not in ("auto", "cpu", "cuda"):
            raise ValueError(f"providers must be auto, cpu, cuda or a list, not {want!r}")
        if want == "auto" and _cuda_failure is None and not _nvidia_device_present():
            _cuda_failure = "no NVIDIA device is visible (/dev/nvidiactl)"
            log.info("CUDAExecutionProvider not tried: %s; using CPU", _cuda_failure)
        try_cuda = want == "cuda" or (
            want == "auto" and "CUDAExecutionProvider" in available and _cuda_failure is None
        )
        if try_cuda:
            try:
                sess = ort.InferenceSession(
                    model,
                    sess_options=_session_options(cfg, quiet=want == "auto"),
                    providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                )
                if sess.get_providers()[0] == "CUDAExecutionProvider":
                    return sess
                why = "it did not initialise (no usable GPU or CUDA libraries)"
            except Exception as e:  # ORT raises plain RuntimeError/Fail for EP failures
                why = f"it failed to start: {e}"
            _cuda_failure = why
            if want == "cuda":
                raise BundleError(f"CUDAExecutionProvider requested but {why}; use providers='cpu'")
            log.info("CUDAExecutionProvider is installed but %s; using CPU", why)
        return ort.InferenceSession(model, sess_options=_session_options(cfg), providers=["CPUExecutionProvider"])
    return ort.InferenceSession(model, sess_options=_session_options(cfg), providers=list(want))


class StepSession:
    """One ONNX Runtime session over a step graph, with the contract's I/O names.

    Used by `Bundle` and by export's parity checks, so both run the exact same code."""

    def __init__(self, model: bytes, cfg: RuntimeConfig = RuntimeConfig()) -> None:
        self.cfg = cfg
        self.session = _make_session(model, cfg)
        self.providers: list[str] = self.session.get_providers()
        self.on_cuda = self.providers[0] == "CUDAExecutionProvider"
        self.io_binding = self.on_cuda if cfg.io_binding is None else cfg.io_binding
        names_in = tuple(i.name for i in self.session.get_inputs())
        names_out = tuple(o.name for o in self.session.get_outputs())
        if set(names_in) != set(STEP_INPUTS) or set(names_out) != set(STEP_OUTPUTS):
            raise BundleError(
                f"step graph has inputs {names_in} / outputs {names_out}, this clickvec expects "
                f"{STEP_INPUTS} / {STEP_OUTPUTS}: re-export the model with this clickvec version"
            )
        shape = self.session.get_inputs()[names_in.index(IN_H)].shape  # [L, "B", H]
        self.layers, self.hidden = int(shape[0]), int(shape[2])

    def run(
        self, items: Array, etypes: Array, gaps: Array, lengths: Array, h: Array, c: Array
    ) -> StepResult:
        feeds: dict[str, Array] = {
            IN_ITEM: np.ascontiguousarray(items, dtype=np.int64),
            IN_ETYPE: np.ascontiguousarray(etypes, dtype=np.int64),
            IN_GAP: np.ascontiguousarray(gaps, dtype=np.int64),
            IN_LENGTHS: np.ascontiguousarray(lengths, dtype=np.int32),
            IN_H: np.ascontiguousarray(h, dtype=np.float32),
            IN_C: np.ascontiguousarray(c, dtype=np.float32),
        }
        _check_shapes(feeds, self.layers, self.hidden)
        if self.io_binding:
            # Inputs copied to the device once, outputs allocated there by ORT and copied
            # back in STEP_OUTPUTS order (the order they are bound in).
            binding = self.session.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            device = "cuda" if self.on_cuda else "cpu"
            for name in STEP_OUTPUTS:
                binding.bind_output(name, device)
            self.session.run_with_iobinding(binding)
            out = binding.copy_outputs_to_cpu()
        else:
            out = self.session.run(list(STEP_OUTPUTS), feeds)
        h_new, c_new, z_seq, z_last, surprise = out
        return h_new, c_new, z_seq, z_last, surprise


def _check_shapes(f: dict[str, Array], layers: int, hidden: int) -> None:
    items, lengths, h = f[IN_ITEM], f[IN_LENGTHS], f[IN_H]
    if items.ndim != 2 or items.shape[0] < 1 or items.shape[1] < 1:
        raise ValueError(f"items must be (T, B) with T, B >= 1, got {items.shape}")
    T, B = items.shape
    if f[IN_ETYPE].shape != (T, B) or f[IN_GAP].shape != (T, B):
        raise ValueError(f"items, etypes, gaps must share shape (T, B) = {(T, B)}")
    if lengths.shape != (B,) or lengths.min() < 1 or lengths.max() > T:
        raise ValueError(f"lengths must be (B,) = ({B},) with 1 <= lengths <= T = {T}")
    if h.shape != (layers, B, hidden) or f[IN_C].shape != (layers, B, hidden):
        raise ValueError(f"h and c must be (L, B, H) = {(layers, B, hidden)}, got {h.shape}, {f[IN_C].shape}")


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


def load_bundle(
    path: str | Path,
    providers: str | Sequence[str] = "auto",
    *,
    variant: str = "fp32",
    intra_op_threads: int = 0,
    allow_spinning: bool = True,
    io_binding: bool | None = None,
    warmup: bool = True,
) -> Bundle:
    """Verify every file of the bundle at `path` against its manifest, then open the
    chosen encoder variant. Raises `BundleError` on anything that does not match."""
    path = Path(path)
    manifest = _verified_manifest(path)
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


__all__ = [
    "BUNDLE_FORMAT",
    "Bundle",
    "BundleError",
    "RuntimeConfig",
    "StepSession",
    "load_bundle",
]
