"""Contender (d), recompute: no recurrent state; each user's whole history is kept in
memory and re-encoded from the zero state on every event (one ONNX Runtime call over
the full history). The Faust worker lives in benchmarks/naive_agent.py (--mode
recompute); this module also times the per-event cost against history length.

  python -m benchmarks.recompute --model BUNDLE ...        (the worker, as naive_agent)
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from benchmarks.naive_agent import Recompute
from benchmarks.naive_agent import main as _agent_main


def per_event_cost(bundle: Any, history: int, min_seconds: float = 0.5, rng_seed: int = 0) -> float:
    """Seconds per event for recompute when the user already has `history` events."""
    rng = np.random.default_rng(rng_seed)
    seq = np.stack([rng.integers(2, bundle.spec.n_items, history + 1),
                    rng.integers(2, bundle.spec.n_event_types, history + 1),
                    rng.integers(1, 24, history + 1)], axis=1).astype(np.int64)
    h0, c0 = bundle.zero_state(1)
    lengths = np.array([len(seq)], np.int32)
    bundle.step(seq[:, 0:1], seq[:, 1:2], seq[:, 2:3], lengths, h0, c0)
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < min_seconds:
        bundle.step(seq[:, 0:1], seq[:, 1:2], seq[:, 2:3], lengths, h0, c0)
        n += 1
    return (time.perf_counter() - t0) / n


__all__ = ["Recompute", "per_event_cost"]

if __name__ == "__main__":
    _agent_main(["--mode", "recompute", *sys.argv[1:]])
