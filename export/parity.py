"""Parity of the exported step graph: checked, collected, fatal.

(a) ONNX Runtime vs PyTorch (`Encoder.step`) on random batches (equal and ragged lengths,
    random incoming state) and on real sequences when given.
(b) Streaming vs offline, both in ONNX Runtime: feeding each user's events one at a time,
    or in random ragged chunks with users interleaved across calls, gives the same z after
    every event, the same surprise and the same final state as one call over the whole
    sequence from the zero state.

Every comparison is recorded; any one over tolerance raises `ParityError` listing all of
them. There is no warning mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from clickvec.bundle.runtime import RuntimeConfig, StepSession
from clickvec.errors import ClickvecError
from clickvec.training.model import Encoder

TOL = 1e-5  # max abs difference, float32, on states and vectors
# Surprise is a log-probability over the whole catalogue (about 9-20 nats on 10k+ items):
# float32 carries ~7 significant digits there, so it is checked relative to its size.


class ParityError(ClickvecError):
    """The exported graph does not compute what the PyTorch model computes (or streaming
    does not equal offline encoding). Action: do not ship this bundle; the message lists
    every mismatch — report it with the run directory."""

    def __init__(self, mismatches: list[str], max_diff: float) -> None:
        self.mismatches = mismatches
        self.max_diff = max_diff
        super().__init__(
            f"{len(mismatches)} parity mismatch(es), max abs diff {max_diff:.3g} (tolerance {TOL:g}):\n  "
            + "\n  ".join(mismatches)
        )


@dataclass
class Collector:
    tol: float = TOL
    max_diff: dict[str, float] = field(default_factory=dict)
    cases: dict[str, int] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)

    def compare(self, check: str, case: str, got: np.ndarray, want: np.ndarray) -> None:
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        if got.shape != want.shape:
            self.mismatches.append(f"{check}/{case}: shape {got.shape} != {want.shape}")
            self.max_diff[check] = float("inf")
            return
        diff = np.abs(got - want)
        if check.endswith(".surprise"):
            diff = diff / np.maximum(1.0, np.abs(want))
        d = float(np.max(diff)) if got.size else 0.0
        if not np.isfinite(d):
            d = float("inf")
        self.max_diff[check] = max(self.max_diff.get(check, 0.0), d)
        if not d <= self.tol:
            self.mismatches.append(f"{check}/{case}: max abs diff {d:.3g}")

    def case(self, group: str, n: int = 1) -> None:
        self.cases[group] = self.cases.get(group, 0) + n

    def report(self) -> dict[str, Any]:
        return {
            "tolerance": self.tol,
            "surprise_tolerance": "relative to max(1, |surprise|)",
            "max_abs_diff": {k: self.max_diff[k] for k in sorted(self.max_diff)},
            "max_abs_diff_overall": max(self.max_diff.values(), default=0.0),
            "cases": dict(sorted(self.cases.items())),
            "passed": not self.mismatches,
        }


# ------------------------------------------------------------------------ helpers


def random_sequences(
    rng: np.random.Generator, n_items: int, n_types: int, n_gaps: int, n_users: int, max_len: int
) -> list[np.ndarray]:
    """Users' encoded sequences (n, 3); indices >= 1 (OOV included, padding never)."""
    out = []
    for _ in range(n_users):
        n = int(rng.integers(1, max_len + 1))
        out.append(
            np.stack(
                [rng.integers(1, n_items, n), rng.integers(1, n_types, n), rng.integers(1, n_gaps, n)], axis=1
            ).astype(np.int64)
        )
    return out


def pack(chunks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Chunks (n_b, 3) for B users -> time-major (T, B) items, types, gaps (0-padded), lengths."""
    T = max(len(c) for c in chunks)
    x = np.zeros((3, T, len(chunks)), np.int64)
    for b, c in enumerate(chunks):
        x[:, : len(c), b] = c.T
    return x[0], x[1], x[2], np.array([len(c) for c in chunks], np.int32)


@dataclass
class Encoded:
    """One user's reference encoding: z and surprise after each event, final state."""

    z: np.ndarray  # (n, D)
    surprise: np.ndarray  # (n,)
    h: np.ndarray  # (L, H)
    c: np.ndarray  # (L, H)


def offline(sess: StepSession, seq: np.ndarray) -> Encoded:
    """Whole sequence in one call from the zero state (B = 1)."""
    L, H = sess.layers, sess.hidden
    zeros = np.zeros((L, 1, H), np.float32)
    items, types, gaps, lengths = pack([seq])
    h, c, z_seq, _, s = sess.run(items, types, gaps, lengths, zeros, zeros)
    return Encoded(z_seq[:, 0], s[:, 0], h[:, 0], c[:, 0])


def streamed(
    sess: StepSession, seqs: Sequence[np.ndarray], rng: np.random.Generator, max_chunk: int, max_batch: int
) -> tuple[list[Encoded], float]:
    """Feed users' sequences in random chunks of 1..max_chunk events, random subsets of
    users per call (in random order), each user carrying its state between calls.
    Also returns max |z_last - z_seq[length - 1]| over all calls."""
    L, H, n_users = sess.layers, sess.hidden, len(seqs)
    pos = [0] * n_users
    h = np.zeros((L, n_users, H), np.float32)
    c = np.zeros((L, n_users, H), np.float32)
    z_out: list[list[np.ndarray]] = [[] for _ in seqs]
    s_out: list[list[np.ndarray]] = [[] for _ in seqs]
    z_last_diff = 0.0
    while True:
        live = [u for u in range(n_users) if pos[u] < len(seqs[u])]
        if not live:
            break
        k = int(rng.integers(1, min(max_batch, len(live)) + 1))
        users = rng.permutation(live)[:k]
        chunks = []
        for u in users:
            n = int(rng.integers(1, max_chunk + 1))
            chunks.append(seqs[u][pos[u] : pos[u] + n])
        items, types, gaps, lengths = pack(chunks)
        h_new, c_new, z_seq, z_last, surprise = sess.run(items, types, gaps, lengths, h[:, users], c[:, users])
        for b, u in enumerate(users):
            n = int(lengths[b])
            z_out[u].append(z_seq[:n, b])
            s_out[u].append(surprise[:n, b])
            # z_last must be z after this user's last event in the call.
            z_last_diff = max(z_last_diff, float(np.max(np.abs(z_last[b] - z_seq[n - 1, b]))))
            pos[u] += n
        h[:, users] = h_new
        c[:, users] = c_new
    return [
        Encoded(np.concatenate(z_out[u]), np.concatenate(s_out[u]), h[:, u], c[:, u]) for u in range(n_users)
    ], z_last_diff


# ------------------------------------------------------------------------- checks


def _torch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def _vs_torch_equal(model: Encoder, sess: StepSession, col: Collector, rng: np.random.Generator) -> None:
    cfg = model.cfg
    L, H = cfg.layers, cfg.hidden
    for T, B in ((1, 1), (1, 9), (4, 3), (17, 5)):
        items = rng.integers(1, cfg.n_items, (T, B))
        types = rng.integers(1, cfg.n_event_types, (T, B))
        gaps = rng.integers(1, cfg.n_gap_buckets, (T, B))
        h0 = (rng.standard_normal((L, B, H)) * 0.5).astype(np.float32)
        c0 = (rng.standard_normal((L, B, H)) * 0.5).astype(np.float32)
        ref = model.step(_torch(items), _torch(types), _torch(gaps), _torch(h0), _torch(c0))
        h, c, z_seq, z_last, s = sess.run(items, types, gaps, np.full(B, T, np.int32), h0, c0)
        case = f"T={T},B={B}"
        col.compare("torch_equal.h", case, h, ref[0].numpy())
        col.compare("torch_equal.c", case, c, ref[1].numpy())
        col.compare("torch_equal.z_seq", case, z_seq, ref[2].numpy())
        col.compare("torch_equal.z_last", case, z_last, ref[2][-1].numpy())
        col.compare("torch_equal.surprise", case, s, ref[3].numpy())
        col.case("torch_equal_batches")


def _vs_torch_ragged(
    model: Encoder, sess: StepSession, col: Collector, seqs: Sequence[np.ndarray], group: str,
    rng: np.random.Generator, random_state: bool, batch: int = 16,
) -> None:
    """Ragged batches against torch run user by user on exactly that user's events."""
    L, H = model.cfg.layers, model.cfg.hidden
    for start in range(0, len(seqs), batch):
        chunk = list(seqs[start : start + batch])
        B = len(chunk)
        if random_state:
            h0 = (rng.standard_normal((L, B, H)) * 0.5).astype(np.float32)
            c0 = (rng.standard_normal((L, B, H)) * 0.5).astype(np.float32)
        else:
            h0 = np.zeros((L, B, H), np.float32)
            c0 = np.zeros((L, B, H), np.float32)
        items, types, gaps, lengths = pack(chunk)
        h, c, z_seq, z_last, s = sess.run(items, types, gaps, lengths, h0, c0)
        for b, seq in enumerate(chunk):
            n = len(seq)
            t = _torch(seq.T[:, :, None])  # (3, n, 1)
            rh, rc, rz, rs = model.step(t[0], t[1], t[2], _torch(h0[:, b : b + 1]), _torch(c0[:, b : b + 1]))
            case = f"user={start + b},n={n},B={B}"
            col.compare(f"{group}.h", case, h[:, b], rh[:, 0].numpy())
            col.compare(f"{group}.c", case, c[:, b], rc[:, 0].numpy())
            col.compare(f"{group}.z_seq", case, z_seq[:n, b], rz[:, 0].numpy())
            col.compare(f"{group}.z_last", case, z_last[b], rz[-1, 0].numpy())
            col.compare(f"{group}.surprise", case, s[:n, b], rs[:, 0].numpy())
        col.case(f"{group}_users", B)


def _stream_vs_offline(
    sess: StepSession, col: Collector, seqs: Sequence[np.ndarray], group: str, rng: np.random.Generator
) -> None:
    ref = [offline(sess, s) for s in seqs]
    for mode, max_chunk, max_batch in (("event_by_event", 1, 8), ("ragged_chunks", 7, len(seqs))):
        got, z_last_diff = streamed(sess, seqs, rng, max_chunk, max_batch)
        col.compare(f"{group}.z_last", mode, np.array(z_last_diff), np.array(0.0))
        for u, (g, r) in enumerate(zip(got, ref, strict=True)):
            case = f"{mode},user={u},n={len(seqs[u])}"
            col.compare(f"{group}.z", case, g.z, r.z)
            col.compare(f"{group}.surprise", case, g.surprise, r.surprise)
            col.compare(f"{group}.h", case, g.h, r.h)
            col.compare(f"{group}.c", case, g.c, r.c)
        col.case(f"{group}_{mode}_users", len(seqs))
        col.case(f"{group}_{mode}_events", int(sum(len(s) for s in seqs)))


def check_parity(
    model: Encoder,
    onnx_model: bytes,
    sequences: Sequence[np.ndarray] | None = None,
    seed: int = 0,
    n_users: int = 24,
    max_len: int = 40,
    max_real: int = 64,
) -> dict[str, Any]:
    """Run every parity check on `onnx_model` (serialized step graph) against `model`.
    Returns the figures for the manifest; raises `ParityError` listing every mismatch."""
    model = model.eval()
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    sess = StepSession(onnx_model, RuntimeConfig(providers="cpu", warmup=False))
    col = Collector()

    rand = random_sequences(rng, cfg.n_items, cfg.n_event_types, cfg.n_gap_buckets, n_users, max_len)
    _vs_torch_equal(model, sess, col, rng)
    _vs_torch_ragged(model, sess, col, rand, "torch_ragged", rng, random_state=True)
    _stream_vs_offline(sess, col, rand, "stream_random", rng)
    if sequences:
        real = [np.asarray(s, np.int64) for s in sequences if len(s) > 0][:max_real]
        _vs_torch_ragged(model, sess, col, real, "torch_real", rng, random_state=False)
        _stream_vs_offline(sess, col, real, "stream_real", rng)

    report = col.report()
    report["seed"] = seed
    if col.mismatches:
        raise ParityError(col.mismatches, report["max_abs_diff_overall"])
    return report
