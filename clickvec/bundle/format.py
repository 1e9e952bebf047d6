"""The bundle file format: file names, the step graph's input/output names and shapes,
hashing and the sealed manifest. Shared by the writer (export) and the reader (stream)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from clickvec.errors import ClickvecError

# ------------------------------------------------------------ step graph (ONNX) inputs/outputs

# Named once here; export writes them, stream reads them.
# A ragged batch of T steps for B users, time-major.
IN_ITEM = "item"  # item index (0 = padding)
IN_ETYPE = "event_type"  # event-type index (0 = padding)
IN_GAP = "gap"  # time-gap bucket (0 = padding, 1 = first event)
IN_LENGTHS = "lengths"  # number of valid steps per user (>= 1)
IN_H = "h_in"  # LSTM state handed in
IN_C = "c_in"
OUT_H = "h_out"  # LSTM state after each user's own last valid step
OUT_C = "c_out"
OUT_Z_SEQ = "z_seq"  # vector after each event (rows past a user's length undefined)
OUT_Z_LAST = "z_last"  # vector after each user's last event
OUT_SURPRISE = "surprise"  # -log p(item_t | z_{t-1}) - log p(event_type_t | z_{t-1})

STEP_INPUTS = (IN_ITEM, IN_ETYPE, IN_GAP, IN_LENGTHS, IN_H, IN_C)
STEP_OUTPUTS = (OUT_H, OUT_C, OUT_Z_SEQ, OUT_Z_LAST, OUT_SURPRISE)

# Element type and shape of each input and output. "T" (steps) and "B" (users) stay
# dynamic; "L", "H" and "D" are the model's layers, hidden size and vector size.
STEP_IO: dict[str, tuple[str, tuple[str, ...]]] = {
    IN_ITEM: ("int64", ("T", "B")),
    IN_ETYPE: ("int64", ("T", "B")),
    IN_GAP: ("int64", ("T", "B")),
    IN_LENGTHS: ("int32", ("B",)),
    IN_H: ("float32", ("L", "B", "H")),
    IN_C: ("float32", ("L", "B", "H")),
    OUT_H: ("float32", ("L", "B", "H")),
    OUT_C: ("float32", ("L", "B", "H")),
    OUT_Z_SEQ: ("float32", ("T", "B", "D")),
    OUT_Z_LAST: ("float32", ("B", "D")),
    OUT_SURPRISE: ("float32", ("T", "B")),
}


def step_io(layers: int, hidden: int, z_dim: int) -> dict[str, tuple[str, list[int | str]]]:
    """`STEP_IO` with one model's sizes filled in: name -> (dtype, shape)."""
    sizes = {"L": layers, "H": hidden, "D": z_dim}
    return {name: (dtype, [sizes.get(d, d) for d in shape]) for name, (dtype, shape) in STEP_IO.items()}


# ------------------------------------------------------------------------ bundle files

BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
VOCAB = "vocab.json"
ITEM_EMBEDDINGS = "item_embeddings.npy"
ITEM_BIAS = "item_bias.npy"
ITEM_PROJ_WEIGHT = "item_proj_weight.npy"
ITEM_PROJ_BIAS = "item_proj_bias.npy"
ENCODER_FILES = {"fp32": "encoder.onnx", "fp16": "encoder.fp16.onnx", "int8": "encoder.int8.onnx"}
# The item scoring tables by their manifest role: score = (proj_weight @ z + proj_bias)
# . embeddings[i] + bias[i].
ITEM_TABLES = {
    "embeddings": ITEM_EMBEDDINGS,
    "bias": ITEM_BIAS,
    "proj_weight": ITEM_PROJ_WEIGHT,
    "proj_bias": ITEM_PROJ_BIAS,
}
# Everything besides the encoder that defines what a vector means.
CONTENT_FILES = (VOCAB, ITEM_EMBEDDINGS, ITEM_BIAS, ITEM_PROJ_WEIGHT, ITEM_PROJ_BIAS)
DIGEST_KEY = "manifest_sha256"


class BundleError(ClickvecError):
    """A model bundle that cannot be trusted or used (missing file, hash mismatch, wrong
    format). Action: re-export it with `clickvec export runs/NAME --out models/NAME`, or
    copy the whole bundle directory again; never edit files inside a bundle by hand."""


# ---------------------------------------------------------------- hashing and the seal


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
