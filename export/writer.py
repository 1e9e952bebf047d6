"""Write a verified model bundle from a training run (format: see clickvec/bundle/format.py).

checkpoint -> step graph (onnx.checker) -> parity (fatal) -> files -> optional float16 /
int8 encoders (each gated on vector cosine to float32) -> manifest (hashes, model id,
figures) -> optional signature.json (`sign`: an Ed25519 key, clickvec/bundle/signing.py),
written to a temporary directory and moved into place only when complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

import clickvec
from clickvec.bundle.format import (
    BUNDLE_FORMAT,
    ENCODER_FILES,
    ITEM_TABLES,
    MANIFEST,
    STEP_INPUTS,
    STEP_OUTPUTS,
    VOCAB,
    compute_model_id,
    seal_manifest,
    sha256_file,
    step_io,
)
from clickvec.bundle.runtime import RuntimeConfig, StepSession
from clickvec.errors import ClickvecError
from clickvec.export.graph import IR_VERSION, OPSET, build_step_graph
from clickvec.export.parity import check_parity, random_sequences
from clickvec.export.surprise import (
    SurpriseMode,
    approx_figures,
    approximate_model_graph,
    manifest_entry,
    parse_mode,
    resolve,
)
from clickvec.export.variants import HOW, MIN_COSINE, quantize_int8, refusal, variant_figures
from clickvec.features import FeatureSpec
from clickvec.training.checkpoint import load_checkpoint
from clickvec.training.model import Encoder

log = logging.getLogger(__name__)


class ExportError(ClickvecError):
    """The export could not produce a bundle. Action: read the message; nothing was
    written to the output directory."""


def _jsonable(x: Any) -> Any:
    """Checkpoint payload values -> strict JSON (paths as strings, NaN/inf as null)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, int, str)) or x is None:
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (np.generic, torch.Tensor)) and np.size(x) == 1:
        return _jsonable(x.item())
    return str(x)


# -------------------------------------------------------------------------- export


def load_sequences(path: str | Path) -> list[np.ndarray]:
    """Encoded user sequences for parity and variant checks: an .npz whose arrays are
    each one user's (n, 3) int64 (item, type, gap), as `FeatureSpec.encode_sequence` makes."""
    with np.load(path, allow_pickle=False) as z:
        seqs = [np.asarray(z[k], np.int64) for k in z.files]
    bad = [s.shape for s in seqs if s.ndim != 2 or s.shape[1] != 3]
    if bad:
        raise ExportError(f"{path}: every array must be (n, 3) encoded events, found {bad[:3]}")
    return [s for s in seqs if len(s)]


def export_bundle(
    run: str | Path,
    out: str | Path,
    *,
    fp16: bool = False,
    int8: bool = False,
    sequences: Sequence[np.ndarray] | None = None,
    min_cosine: float = MIN_COSINE,
    seed: int = 0,
    force: bool = False,
    sign: str | Path | None = None,
    surprise: str = "auto",
) -> dict[str, Any]:
    """Export the checkpoint at `run` (run directory or .pt) to a bundle directory `out`,
    signed with the Ed25519 private key file `sign` when given, its surprise computed as
    `surprise` says (export/surprise.py). Returns the manifest.
    Raises ParityError (nothing written) if the graph is wrong."""
    out = Path(out)
    mode = parse_mode(surprise)  # a bad value fails before the checkpoint is read
    if out.exists() and not force:
        raise ExportError(f"{out} already exists: choose another --out or pass --force to replace it")
    signing_key = None
    if sign is not None:  # a bad key file fails now, not after the parity checks
        from clickvec.bundle.signing import load_private_key

        signing_key = load_private_key(sign)
    model, spec, payload = load_checkpoint(run)
    return write_bundle(model, spec, payload, out, fp16=fp16, int8=int8, sequences=sequences,
                        min_cosine=min_cosine, seed=seed, source=str(run), signing_key=signing_key,
                        surprise=mode)


def write_bundle(
    model: Encoder,
    spec: FeatureSpec,
    payload: dict[str, Any],
    out: Path,
    *,
    fp16: bool = False,
    int8: bool = False,
    sequences: Sequence[np.ndarray] | None = None,
    min_cosine: float = MIN_COSINE,
    seed: int = 0,
    source: str = "",
    signing_key: Any = None,
    surprise: SurpriseMode | str = "auto",
) -> dict[str, Any]:
    model = model.eval()
    _check_sizes(model, spec)
    mode = resolve(parse_mode(surprise) if isinstance(surprise, str) else surprise, model.cfg.n_items)
    proto = build_step_graph(model)
    encoder = proto.SerializeToString()
    real = list(sequences or [])
    log.info("checking parity (ONNX Runtime vs PyTorch; streamed vs offline) ...")
    parity = check_parity(model, encoder, sequences=real, seed=seed)
    log.info("parity passed: max abs diff %.3g over %s", parity["max_abs_diff_overall"], parity["cases"])
    surprise_info = manifest_entry(mode, model.cfg.n_items)
    if mode.kind == "approx":
        # Parity holds for the exact graph; the approximate one shares every node but the
        # item softmax, and `approx_figures` checks that its vectors and states are the same.
        proto = approximate_model_graph(proto, model, mode, seed)
        approx = proto.SerializeToString()
        surprise_info = manifest_entry(mode, model.cfg.n_items, approx_figures(model, encoder, approx, real, seed))
        encoder = approx

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / ENCODER_FILES["fp32"]).write_bytes(encoder)
        scoring = _write_tables(tmp, model, spec)
        wanted = [v for v, on in (("fp16", fp16), ("int8", int8)) if on]
        variants, refused = _write_variants(tmp, model, encoder, wanted, real, scoring, min_cosine, seed, mode)
        files: dict[str, dict[str, Any]] = {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.iterdir()) if p.is_file()
        }
        hashes = {k: v["sha256"] for k, v in files.items()}
        for v, meta in variants.items():
            meta["model_id"] = compute_model_id(hashes, ENCODER_FILES[v])
        manifest = _manifest(model, spec, payload, proto, parity, variants, refused, files, source)
        manifest["surprise"] = surprise_info
        (tmp / MANIFEST).write_bytes(seal_manifest(manifest))
        if signing_key is not None:
            from clickvec.bundle.signing import write_signature

            write_signature(tmp, signing_key)
        tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is read by other users (the worker)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote bundle %s model_id=%s (%s)", out, manifest["model_id"][:12], ", ".join(variants))
    return manifest


def _check_sizes(model: Encoder, spec: FeatureSpec) -> None:
    cfg = model.cfg
    if (cfg.n_items, cfg.n_event_types, cfg.n_gap_buckets) != (spec.n_items, spec.n_event_types, spec.n_gap_buckets):
        raise ExportError(
            f"model sizes (items={cfg.n_items}, types={cfg.n_event_types}, gaps={cfg.n_gap_buckets}) do not "
            f"match the feature spec ({spec.n_items}, {spec.n_event_types}, {spec.n_gap_buckets})"
        )


def _write_tables(tmp: Path, model: Encoder, spec: FeatureSpec) -> dict[str, np.ndarray]:
    """The vocabulary and the item scoring tables; returns the tables by role (`ITEM_TABLES`)."""
    (tmp / VOCAB).write_text(json.dumps(spec.to_json(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    sd = model.state_dict()
    scoring = {
        "embeddings": sd["item_emb.weight"].float().numpy(),  # (N, Ei)
        "bias": sd["item_bias"].float().numpy(),  # (N,)
        "proj_weight": sd["item_proj.weight"].float().numpy(),  # (Ei, D)
        "proj_bias": sd["item_proj.bias"].float().numpy(),  # (Ei,)
    }
    for role, name in ITEM_TABLES.items():
        np.save(tmp / name, np.ascontiguousarray(scoring[role], np.float32))
    return scoring


def _write_variants(
    tmp: Path, model: Encoder, encoder: bytes, wanted: Sequence[str], real: Sequence[np.ndarray],
    scoring: dict[str, np.ndarray], min_cosine: float, seed: int, mode: SurpriseMode,
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Write each wanted smaller encoder next to the float32 one in `tmp`; one that is not
    close enough to float32 is deleted again. Returns (kept variants, refused ones: why)."""
    variants: dict[str, dict[str, Any]] = {"fp32": {"file": ENCODER_FILES["fp32"], "weights": "float32"}}
    refused: dict[str, str] = {}
    if not wanted:
        return variants, refused
    cfg = model.cfg
    rng = np.random.default_rng(seed + 1)
    check_seqs = random_sequences(rng, cfg.n_items, cfg.n_event_types, cfg.n_gap_buckets, 64, 50) + real[:256]
    ref = StepSession(encoder, RuntimeConfig(providers="cpu", warmup=False))
    for v in wanted:
        path = tmp / ENCODER_FILES[v]
        if v == "fp16":
            fp16 = build_step_graph(model, weight_dtype="float16")
            if mode.kind == "approx":
                fp16 = approximate_model_graph(fp16, model, mode, seed)
            path.write_bytes(fp16.SerializeToString())
        else:
            quantize_int8(tmp / ENCODER_FILES["fp32"], path)
        fig = variant_figures(ref, StepSession(path.read_bytes(), RuntimeConfig(providers="cpu")),
                              check_seqs, real[:256], scoring)
        fig.update(file=ENCODER_FILES[v], weights=HOW[v], min_cosine_bound=min_cosine)
        why = refusal(fig, min_cosine)
        if why is not None:
            path.unlink()
            refused[v] = why
            log.error("%s encoder refused (not written): %s", v, why)
            continue
        log.info("%s encoder: cosine to float32 min %.5f mean %.5f", v, fig["cosine_to_fp32"]["min"],
                 fig["cosine_to_fp32"]["mean"])
        variants[v] = fig
    return variants, refused


def _manifest(
    model: Encoder, spec: FeatureSpec, payload: dict[str, Any], proto: onnx.ModelProto,
    parity: dict[str, Any], variants: dict[str, dict[str, Any]], refused: dict[str, str],
    files: dict[str, dict[str, Any]], source: str,
) -> dict[str, Any]:
    cfg = model.cfg
    L, H, D = cfg.layers, cfg.hidden, cfg.z_dim
    io = {name: {"dtype": dtype, "shape": shape} for name, (dtype, shape) in step_io(L, H, D).items()}
    return {
        "bundle_format": BUNDLE_FORMAT,
        "model_id": variants["fp32"]["model_id"],
        "dims": {
            "layers": L, "hidden": H, "z_dim": D, "item_dim": cfg.item_dim, "type_dim": cfg.type_dim,
            "gap_dim": cfg.gap_dim, "n_items": cfg.n_items, "n_event_types": cfg.n_event_types,
            "n_gap_buckets": cfg.n_gap_buckets,
        },
        "feature_spec": {
            "file": VOCAB,
            "kind": "hash" if spec.hash_buckets else "vocabulary",
            "vocabulary_items": len(spec.items),
            "hash_buckets": spec.hash_buckets,
            "event_types": list(spec.event_types),
            "n_gap_buckets": spec.n_gap_buckets,
            "indices": "0 = padding, 1 = out of vocabulary / first event",
        },
        "graph": {
            "opset": OPSET,
            "ir_version": IR_VERSION,
            "inputs": list(STEP_INPUTS),
            "outputs": list(STEP_OUTPUTS),
            "io": io,
            "semantics": "lengths[b] valid steps per user; state after each user's own last step; "
                         "surprise[t] = -log p(item_t | state before event t); z = z_head(h) (VAE: the mean)",
        },
        "variants": variants,
        "refused_variants": refused,
        "item_scoring": {
            **ITEM_TABLES,
            "formula": "score[i] = (proj_weight @ z + proj_bias) . embeddings[i] + bias[i]",
        },
        "training": _jsonable({
            "source": source,
            "metrics": payload.get("metrics", {}),
            "model_config": payload.get("model_config", cfg.to_dict()),
            "train_config": payload.get("train_config", {}),
            "step": payload.get("step"),
            "epoch": payload.get("epoch"),
        }),
        "parity": parity,
        "files": files,
        "exported_with": {
            "clickvec": clickvec.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
            "torch": torch.__version__, "python": platform.python_version(),
        },
    }
