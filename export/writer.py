"""Write a verified model bundle from a training run (format: see clickvec/bundle.py).

checkpoint -> step graph (onnx.checker) -> parity (fatal) -> files -> optional float16 /
int8 encoders (each gated on vector cosine to float32) -> manifest (hashes, model id,
figures), written to a temporary directory and moved into place only when complete.
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
from clickvec.export.graph import IR_VERSION, OPSET, build_step_graph
from clickvec.export.parity import check_parity, pack, random_sequences
from clickvec.training.checkpoint import load_checkpoint
from clickvec.training.model import Encoder

import clickvec
from clickvec.bundle.format import (
    BUNDLE_FORMAT,
    ENCODER_FILES,
    ITEM_BIAS,
    ITEM_EMBEDDINGS,
    ITEM_PROJ_BIAS,
    ITEM_PROJ_WEIGHT,
    MANIFEST,
    STEP_INPUTS,
    STEP_OUTPUTS,
    VOCAB,
    compute_model_id,
    seal_manifest,
    sha256_file,
)
from clickvec.bundle.runtime import RuntimeConfig, StepSession
from clickvec.errors import ClickvecError
from clickvec.features import FeatureSpec

log = logging.getLogger(__name__)

MIN_COSINE = 0.99  # a float16 / int8 encoder is refused when any checked vector is less similar


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


# ------------------------------------------------------------------------ variants


def _z_rows(sess: StepSession, seqs: Sequence[np.ndarray], batch: int = 64) -> np.ndarray:
    """z after every event of every sequence (each from the zero state), stacked (n, D)."""
    rows = []
    for i in range(0, len(seqs), batch):
        chunk = seqs[i : i + batch]
        items, types, gaps, lengths = pack(chunk)
        zero = np.zeros((sess.layers, len(chunk), sess.hidden), np.float32)
        _, _, z_seq, _, _ = sess.run(items, types, gaps, lengths, zero, zero)
        rows += [z_seq[: len(s), b] for b, s in enumerate(chunk)]
    return np.concatenate(rows)


def _hr10(z_prev: np.ndarray, targets: np.ndarray, scoring: dict[str, np.ndarray]) -> float:
    """Full-catalogue HR@10 of the true next item (padding and OOV never ranked)."""
    q = z_prev @ scoring["proj_w"].T + scoring["proj_b"]
    scores = q @ scoring["emb"].T + scoring["bias"]
    scores[:, :2] = -np.inf
    true = scores[np.arange(len(targets)), targets]
    rank = (scores > true[:, None]).sum(axis=1)
    return float(np.mean(rank < 10))


def _variant_figures(
    ref: StepSession, var: StepSession, seqs: Sequence[np.ndarray], real: Sequence[np.ndarray],
    scoring: dict[str, np.ndarray],
) -> dict[str, Any]:
    z_ref, z_var = _z_rows(ref, seqs), _z_rows(var, seqs)
    cos = np.sum(z_ref * z_var, 1) / (np.linalg.norm(z_ref, axis=1) * np.linalg.norm(z_var, axis=1) + 1e-12)
    fig: dict[str, Any] = {
        "vectors_checked": int(len(cos)),
        "cosine_to_fp32": {
            "min": float(cos.min()),
            "p01": float(np.quantile(cos, 0.01)),
            "mean": float(cos.mean()),
        },
        "max_abs_diff_to_fp32": float(np.max(np.abs(z_ref - z_var))),
    }
    evalable = [s for s in real if len(s) >= 2]
    if evalable:
        prefixes = [s[:-1] for s in evalable]
        last = np.array([len(p) - 1 for p in prefixes])
        targets = np.array([s[-1, 0] for s in evalable])
        offs = np.concatenate([[0], np.cumsum([len(p) for p in prefixes])[:-1]])
        hr = {}
        for name, sess in (("fp32", ref), ("variant", var)):
            hr[name] = _hr10(_z_rows(sess, prefixes)[offs + last], targets, scoring)
        fig["hr@10"] = {"fp32": hr["fp32"], "variant": hr["variant"], "change": hr["variant"] - hr["fp32"],
                        "users": len(evalable), "protocol": "next item after each real sequence, full catalogue"}
    return fig


def _quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # LSTM -> DynamicQuantizeLSTM and MatMul -> int8 weights; embeddings (Gather) stay
    # float so the vectors' inputs are exact.
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["LSTM", "MatMul"])


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
) -> dict[str, Any]:
    """Export the checkpoint at `run` (run directory or .pt) to a bundle directory `out`.
    Returns the manifest. Raises ParityError (nothing written) if the graph is wrong."""
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists: choose another --out or pass --force to replace it")
    model, spec, payload = load_checkpoint(run)
    return write_bundle(model, spec, payload, out, fp16=fp16, int8=int8, sequences=sequences,
                        min_cosine=min_cosine, seed=seed, source=str(run))


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
) -> dict[str, Any]:
    model = model.eval()
    cfg = model.cfg
    if (cfg.n_items, cfg.n_event_types, cfg.n_gap_buckets) != (spec.n_items, spec.n_event_types, spec.n_gap_buckets):
        raise ExportError(
            f"model sizes (items={cfg.n_items}, types={cfg.n_event_types}, gaps={cfg.n_gap_buckets}) do not "
            f"match the feature spec ({spec.n_items}, {spec.n_event_types}, {spec.n_gap_buckets})"
        )
    proto = build_step_graph(model)
    encoder = proto.SerializeToString()
    real = list(sequences or [])
    log.info("checking parity (ONNX Runtime vs PyTorch; streamed vs offline) ...")
    parity = check_parity(model, encoder, sequences=real, seed=seed)
    log.info("parity passed: max abs diff %.3g over %s", parity["max_abs_diff_overall"], parity["cases"])

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / ENCODER_FILES["fp32"]).write_bytes(encoder)
        (tmp / VOCAB).write_text(json.dumps(spec.to_json(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        sd = model.state_dict()
        scoring = {
            "emb": sd["item_emb.weight"].float().numpy(),  # (N, Ei)
            "bias": sd["item_bias"].float().numpy(),  # (N,)
            "proj_w": sd["item_proj.weight"].float().numpy(),  # (Ei, D)
            "proj_b": sd["item_proj.bias"].float().numpy(),  # (Ei,)
        }
        for name, key in ((ITEM_EMBEDDINGS, "emb"), (ITEM_BIAS, "bias"), (ITEM_PROJ_WEIGHT, "proj_w"),
                          (ITEM_PROJ_BIAS, "proj_b")):
            np.save(tmp / name, np.ascontiguousarray(scoring[key], np.float32))

        variants: dict[str, dict[str, Any]] = {"fp32": {"file": ENCODER_FILES["fp32"], "weights": "float32"}}
        refused: dict[str, str] = {}
        wanted = [v for v, on in (("fp16", fp16), ("int8", int8)) if on]
        if wanted:
            rng = np.random.default_rng(seed + 1)
            check_seqs = random_sequences(rng, cfg.n_items, cfg.n_event_types, cfg.n_gap_buckets, 64, 50) + real[:256]
            ref = StepSession(encoder, RuntimeConfig(providers="cpu", warmup=False))
        for v in wanted:
            path = tmp / ENCODER_FILES[v]
            if v == "fp16":
                path.write_bytes(build_step_graph(model, weight_dtype="float16").SerializeToString())
                how = "float16 weights, cast to float32 in the graph (half the size; float32 compute)"
            else:
                _quantize_int8(tmp / ENCODER_FILES["fp32"], path)
                how = "onnxruntime.quantization.quantize_dynamic, QInt8 weights of LSTM and MatMul"
            fig = _variant_figures(ref, StepSession(path.read_bytes(), RuntimeConfig(providers="cpu")),
                                   check_seqs, real[:256], scoring)
            fig.update(file=ENCODER_FILES[v], weights=how, min_cosine_bound=min_cosine)
            if fig["cosine_to_fp32"]["min"] < min_cosine:
                path.unlink()
                refused[v] = (f"min cosine to float32 {fig['cosine_to_fp32']['min']:.4f} < bound {min_cosine} "
                              f"over {fig['vectors_checked']} vectors")
                log.error("%s encoder refused (not written): %s", v, refused[v])
                continue
            log.info("%s encoder: cosine to float32 min %.5f mean %.5f", v, fig["cosine_to_fp32"]["min"],
                     fig["cosine_to_fp32"]["mean"])
            variants[v] = fig

        files: dict[str, dict[str, Any]] = {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.iterdir()) if p.is_file()
        }
        hashes = {k: v["sha256"] for k, v in files.items()}
        for v, meta in variants.items():
            meta["model_id"] = compute_model_id(hashes, ENCODER_FILES[v])
        manifest = _manifest(model, spec, payload, proto, parity, variants, refused, files, source)
        (tmp / MANIFEST).write_bytes(seal_manifest(manifest))
        tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is read by other users (the worker)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote bundle %s model_id=%s (%s)", out, manifest["model_id"][:12], ", ".join(variants))
    return manifest


def _manifest(
    model: Encoder, spec: FeatureSpec, payload: dict[str, Any], proto: onnx.ModelProto,
    parity: dict[str, Any], variants: dict[str, dict[str, Any]], refused: dict[str, str],
    files: dict[str, dict[str, Any]], source: str,
) -> dict[str, Any]:
    cfg = model.cfg
    L, H, D = cfg.layers, cfg.hidden, cfg.z_dim
    shapes = {
        "item": ["T", "B"], "event_type": ["T", "B"], "gap": ["T", "B"], "lengths": ["B"],
        "h_in": [L, "B", H], "c_in": [L, "B", H], "h_out": [L, "B", H], "c_out": [L, "B", H],
        "z_seq": ["T", "B", D], "z_last": ["B", D], "surprise": ["T", "B"],
    }
    dtypes = {"item": "int64", "event_type": "int64", "gap": "int64", "lengths": "int32"}
    io = {name: {"dtype": dtypes.get(name, "float32"), "shape": shapes[name]} for name in STEP_INPUTS + STEP_OUTPUTS}
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
            "embeddings": ITEM_EMBEDDINGS, "bias": ITEM_BIAS, "proj_weight": ITEM_PROJ_WEIGHT,
            "proj_bias": ITEM_PROJ_BIAS,
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
