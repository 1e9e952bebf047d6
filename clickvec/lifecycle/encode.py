"""Every user's state from their whole history, offline and batched: the same ONNX step
graph the worker runs, many users per call, many steps per call, no padded steps
(`rebuild`: users sorted by length and stepped in lockstep).

The step graph also scores every event against the whole catalogue (`surprise`), which a
rebuild needs only for each user's last event (its vector message carries it). So the
history up to the last event runs through the graph pruned to the recurrent outputs
(`onnx` builds it; without the `onnx` package the full graph runs, several times slower),
and the last event through the full graph, one step. State and vector are those of the
worker applying the same events one batch at a time (≤ 1e-5).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from clickvec.bundle.format import OUT_C, OUT_H, OUT_Z_LAST, STEP_INPUTS
from clickvec.lifecycle.history import History

log = logging.getLogger(__name__)

RECURRENT_OUTPUTS = (OUT_H, OUT_C, OUT_Z_LAST)
MAX_CELLS = 1 << 21  # padded (T x B) cells per call: bounds a call's memory


@dataclass
class Prior:
    """Users' states before a history (a later round of a rebuild): per user in the
    history's order; seq 0 / last_ts -1 / zeros for a user seen first."""

    h: np.ndarray  # (U, L, H)
    c: np.ndarray
    seq: np.ndarray  # (U,) int64
    last_ts: np.ndarray  # (U,) int64


@dataclass
class Rebuilt:
    """Per user of the history, after all its events."""

    h: np.ndarray  # (U, L, H) float32
    c: np.ndarray
    z: np.ndarray  # (U, D) float32 vector after the last event
    surprise: np.ndarray  # (U,) surprise of the last event
    seq: np.ndarray  # (U,) events applied in all
    last_ts: np.ndarray  # (U,) event time of the last event
    infer_s: float = 0.0


class RecurrentSession:
    """The bundle's step graph pruned to h, c and z_last (or the full graph when `onnx`
    is missing)."""

    def __init__(self, bundle: Any, threads: int = 0, pruned: bytes | None = None) -> None:
        """`pruned`: the pruned graph another session built (`pruned_model`), which spares
        this process the `onnx` import (seconds of a rebuild process's start)."""
        import onnxruntime as ort

        from clickvec.bundle.format import ENCODER_FILES

        self.bundle = bundle
        self.threads = threads
        self.pruned = pruned is not None
        model = pruned if pruned is not None else (bundle.path / ENCODER_FILES[bundle.variant]).read_bytes()
        if pruned is None:
            try:
                import onnx
                import onnx.utils

                m = onnx.load_from_string(model)
                sub = onnx.utils.Extractor(m).extract_model(list(STEP_INPUTS), list(RECURRENT_OUTPUTS))
                model, self.pruned = sub.SerializeToString(), True
            except ImportError:
                log.warning("the onnx package is missing (pip install 'clickvec[backfill]'): the rebuild runs "
                            "the full step graph, which also scores every event against the catalogue")
        self.pruned_model = model if self.pruned else None
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = max(0, threads)
        providers = bundle.providers
        self.session = ort.InferenceSession(model, sess_options=so, providers=providers)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, items: np.ndarray, types: np.ndarray, gaps: np.ndarray, lengths: np.ndarray,
            h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.pruned:
            h2, c2, _, z, _ = self.bundle.step(items, types, gaps, lengths, h, c)
            return h2, c2, z
        feeds = dict(zip(STEP_INPUTS, (items, types, gaps, lengths.astype(np.int32), h, c), strict=True))
        out = self.session.run(list(RECURRENT_OUTPUTS), {k: v for k, v in feeds.items() if k in self.inputs})
        return out[0], out[1], out[2]


def _segments(heads: np.ndarray, batch_users: int) -> list[tuple[int, int, int, int]]:
    """Calls that apply every user's first `heads[u]` events with no padding: `heads` is
    sorted descending, so the users with a step `t` left are a prefix of them, the same
    prefix between two adjacent distinct lengths. Each call is (t0, t1, a, b): steps
    t0..t1-1 of users a..b-1, all of them live in every step, at most `batch_users` users
    and MAX_CELLS cells."""
    out: list[tuple[int, int, int, int]] = []
    t0 = 0
    for t1 in np.unique(heads[heads > 0]).tolist():
        live = int(np.count_nonzero(heads >= t1))
        width = max(1, min(batch_users, MAX_CELLS // (t1 - t0)))
        out.extend((t0, t1, a, min(live, a + width)) for a in range(0, live, width))
        t0 = t1
    return out


def rebuild(session: RecurrentSession, hist: History, prior: Prior | None = None,
            batch_users: int = 4096) -> Rebuilt:
    """Apply every user's history to their prior state (zero state without `prior`).

    Users are sorted by history length, longest first, and stepped in lockstep (`_segments`):
    every call is full, with no padded steps, so ONNX Runtime does only the events' own work.
    Each user's last event then goes through the full graph, `batch_users` users a call."""
    b = session.bundle
    U, L, H = len(hist.users), b.layers, b.hidden
    lengths = hist.lengths()
    gaps = hist.gaps(None if prior is None else prior.last_ts)
    h_all = np.zeros((U, L, H), np.float32) if prior is None else prior.h.astype(np.float32, copy=True)
    c_all = np.zeros((U, L, H), np.float32) if prior is None else prior.c.astype(np.float32, copy=True)
    z_all = np.zeros((U, b.z_dim), np.float32)
    sur = np.zeros(U, np.float32)
    order = np.argsort(-lengths, kind="stable")
    order = order[lengths[order] > 0]
    starts, n = hist.starts[order], lengths[order]
    # (L, users, H), users in `order`: a prefix of users is one contiguous block per layer
    hs = np.ascontiguousarray(h_all[order].transpose(1, 0, 2))
    cs = np.ascontiguousarray(c_all[order].transpose(1, 0, 2))
    t0 = time.perf_counter()
    for s0, s1, a, e in _segments(n - 1, batch_users):
        pos = starts[a:e][None, :] + np.arange(s0, s1)[:, None]
        hh, cc, _ = session.run(hist.items[pos], hist.types[pos], gaps[pos], np.full(e - a, s1 - s0, np.int32),
                                hs[:, a:e], cs[:, a:e])
        hs[:, a:e], cs[:, a:e] = hh, cc
    last = starts + n - 1
    for a in range(0, len(order), batch_users):
        e = min(len(order), a + batch_users)
        p = last[None, a:e]
        h1, c1, _, z1, s1 = b.step(hist.items[p], hist.types[p], gaps[p], np.ones(e - a, np.int32),
                                   hs[:, a:e], cs[:, a:e])
        hs[:, a:e], cs[:, a:e] = h1, c1
        z_all[order[a:e]], sur[order[a:e]] = z1, s1[0]
    infer = time.perf_counter() - t0
    h_all[order], c_all[order] = hs.transpose(1, 0, 2), cs.transpose(1, 0, 2)
    seq0 = np.zeros(U, np.int64) if prior is None else prior.seq
    last_ts = hist.ts[np.maximum(hist.starts[1:] - 1, 0)] if hist.events else np.full(U, -1, np.int64)
    if prior is not None:
        last_ts = np.where(lengths > 0, last_ts, prior.last_ts)
    return Rebuilt(h_all, c_all, z_all, sur, seq0 + lengths, last_ts, infer)
