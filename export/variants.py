"""Smaller encoders beside the float32 one: float16 weights and dynamic int8, each kept only
when its vectors stay close to float32's (cosine of every checked vector >= `MIN_COSINE`).

Imports neither torch nor onnx at module level, so `clickvec export --help` can read the
default bound without them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clickvec.bundle.runtime import StepSession

MIN_COSINE = 0.99  # a float16 / int8 encoder is refused when any checked vector is less similar

HOW = {
    "fp16": "float16 weights, cast to float32 in the graph (half the size; float32 compute)",
    "int8": "onnxruntime.quantization.quantize_dynamic, QInt8 weights of LSTM and MatMul",
}


def z_rows(sess: StepSession, seqs: Sequence[np.ndarray], batch: int = 64) -> np.ndarray:
    """z after every event of every sequence (each from the zero state), stacked (n, D)."""
    from clickvec.export.parity import pack  # parity imports torch

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
    q = z_prev @ scoring["proj_weight"].T + scoring["proj_bias"]
    scores = q @ scoring["embeddings"].T + scoring["bias"]
    scores[:, :2] = -np.inf
    true = scores[np.arange(len(targets)), targets]
    rank = (scores > true[:, None]).sum(axis=1)
    return float(np.mean(rank < 10))


def variant_figures(
    ref: StepSession, var: StepSession, seqs: Sequence[np.ndarray], real: Sequence[np.ndarray],
    scoring: dict[str, np.ndarray],
) -> dict[str, Any]:
    """How far the variant's vectors are from float32's, and both HR@10 on `real`."""
    z_ref, z_var = z_rows(ref, seqs), z_rows(var, seqs)
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
            hr[name] = _hr10(z_rows(sess, prefixes)[offs + last], targets, scoring)
        fig["hr@10"] = {"fp32": hr["fp32"], "variant": hr["variant"], "change": hr["variant"] - hr["fp32"],
                        "users": len(evalable), "protocol": "next item after each real sequence, full catalogue"}
    return fig


def refusal(fig: dict[str, Any], min_cosine: float) -> str | None:
    """Why a variant with these figures is refused, or None when it is kept."""
    if fig["cosine_to_fp32"]["min"] < min_cosine:
        return (f"min cosine to float32 {fig['cosine_to_fp32']['min']:.4f} < bound {min_cosine} "
                f"over {fig['vectors_checked']} vectors")
    return None


def quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # LSTM -> DynamicQuantizeLSTM and MatMul -> int8 weights; embeddings (Gather) stay
    # float so the vectors' inputs are exact.
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["LSTM", "MatMul"])
