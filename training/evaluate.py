"""Evaluation: one function, one dict, model and baselines on the same cases and candidates.

Protocols (see FACTS.md, "sequential-recommendation evaluation protocol"):
- sampled: the true next item against `num_negatives` items drawn uniformly from the
  catalogue, rejecting the user's input items (seeded: reruns draw the same candidates);
- full: the true next item ranked against the whole catalogue (padding and OOV excluded).
Ties are scored by their expectation under a random tie-break, so count-based baselines
(whose scores tie often) are neither flattered nor punished by an arbitrary order.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from clickvec.training.baselines import Markov, Popularity, fit_baselines
from clickvec.training.data import EvalCase, Split, pad_inputs
from clickvec.training.model import Encoder


def sample_negatives(
    cases: Sequence[EvalCase], n_items: int, num_negatives: int, seed: int
) -> np.ndarray:
    """(N, num_negatives) item indices in [2, n_items), none in the user's inputs or target."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(cases), num_negatives), dtype=np.int64)
    seen = np.zeros(n_items, dtype=bool)
    for i, c in enumerate(cases):
        hist = c.inputs[:, 0]
        seen[hist] = True
        seen[c.target_item] = True
        if n_items - 2 - int(seen[2:].sum()) < 1:
            raise ValueError(f"catalogue of {n_items - 2} items leaves no negatives for user {c.user}")
        draw = rng.integers(2, n_items, size=num_negatives)
        bad = seen[draw]
        while bad.any():
            draw[bad] = rng.integers(2, n_items, size=int(bad.sum()))
            bad = seen[draw]
        out[i] = draw
        seen[hist] = False
        seen[c.target_item] = False
    return out


def _eval_batches(lengths: np.ndarray, batch_size: int, token_budget: int) -> list[np.ndarray]:
    """Case indices sorted by length, cut so a batch holds at most `batch_size` users and
    its padded (T, B) at most `token_budget` steps (long histories come in small batches)."""
    order = np.argsort(lengths, kind="stable")
    out: list[np.ndarray] = []
    lo = 0
    while lo < len(order):
        hi = lo + 1
        while hi < len(order) and hi - lo < batch_size and lengths[order[hi]] * (hi + 1 - lo) <= token_budget:
            hi += 1
        out.append(order[lo:hi])
        lo = hi
    return out


def _tie_metrics(greater: np.ndarray, ties: np.ndarray, k: int, hit_ok: np.ndarray) -> dict[str, np.ndarray]:
    """Expected HR@k, NDCG@k and RR when the target's rank is uniform over
    [greater, greater + ties] (0-based)."""
    n = int((greater + ties).max()) + 2 if len(greater) else 2
    pos = np.arange(n)
    cum_d = np.concatenate([[0.0], np.cumsum(np.where(pos < k, 1.0 / np.log2(pos + 2.0), 0.0))])
    cum_h = np.concatenate([[0.0], np.cumsum((pos < k).astype(np.float64))])
    cum_r = np.concatenate([[0.0], np.cumsum(1.0 / (pos + 1.0))])
    lo, hi, m = greater, greater + ties + 1, ties + 1.0
    ok = hit_ok.astype(np.float64)
    return {
        "hr": ok * (cum_h[hi] - cum_h[lo]) / m,
        "ndcg": ok * (cum_d[hi] - cum_d[lo]) / m,
        "rr": ok * (cum_r[hi] - cum_r[lo]) / m,
    }


class _Acc:
    """Sums of per-case metrics for one scorer."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, scores: np.ndarray, targets: np.ndarray, negs: np.ndarray, k: int) -> None:
        scores = np.asarray(scores, dtype=np.float64)
        B = len(targets)
        ok = targets >= 2  # an OOV target is a miss in both protocols
        t = scores[np.arange(B), np.maximum(targets, 0)]
        cat = scores[:, 2:]
        g_full = (cat > t[:, None]).sum(1)
        e_full = (cat == t[:, None]).sum(1) - ok.astype(np.int64)
        neg = np.take_along_axis(scores, negs, axis=1)
        g_s = (neg > t[:, None]).sum(1)
        e_s = (neg == t[:, None]).sum(1)
        full = _tie_metrics(g_full, np.maximum(e_full, 0), k, ok)
        samp = _tie_metrics(g_s, e_s, k, ok)
        for name, v in (("full_hr", full["hr"]), ("full_ndcg", full["ndcg"]), ("full_mrr", full["rr"]),
                        ("sampled_hr", samp["hr"]), ("sampled_ndcg", samp["ndcg"])):
            self.sums[name] = self.sums.get(name, 0.0) + float(v.sum())
        self.n += B

    def result(self, k: int) -> dict[str, dict[str, float]]:
        n = max(self.n, 1)
        m = {key: v / n for key, v in self.sums.items()}
        return {
            "sampled": {f"hr@{k}": m.get("sampled_hr", 0.0), f"ndcg@{k}": m.get("sampled_ndcg", 0.0)},
            "full": {f"hr@{k}": m.get("full_hr", 0.0), f"ndcg@{k}": m.get("full_ndcg", 0.0),
                     "mrr": m.get("full_mrr", 0.0)},
        }


@torch.no_grad()
def evaluate(
    model: Encoder | torch.nn.Module,
    split: Split,
    which: str = "valid",
    *,
    device: str | torch.device = "cpu",
    k: int = 10,
    num_negatives: int = 100,
    seed: int = 12345,
    batch_size: int = 512,
    baselines: bool | Sequence[Popularity | Markov] = True,
    max_cases: int = 0,
) -> dict[str, Any]:
    """Evaluate `model` on `split.valid` or `split.test` (optionally the first `max_cases`).

    Returns {"n_users", "model": {sampled, full, item_nll, type_acc, time_*},
    "<baseline>": {sampled, full}, "margins": model / baseline ratios, "compression"}.
    """
    cases: list[EvalCase] = list(getattr(split, which))[: max_cases or None]
    if not cases:
        raise ValueError(f"the {which} split is empty: too few users with >= 3 events")
    enc: Encoder = getattr(model, "module", model)  # unwrap DDP
    was_training = enc.training
    enc.eval()
    n_items = split.spec.n_items
    # The candidates depend only on the cases and the seed: draw once per split and reuse.
    cache = split.cache
    ck = ("negatives", which, len(cases), num_negatives, seed)
    if ck not in cache:
        cache[ck] = sample_negatives(cases, n_items, num_negatives, seed)
    negs = cache[ck]
    targets = np.asarray([c.target_item for c in cases], dtype=np.int64)
    if baselines is True:
        bls: Sequence[Popularity | Markov] = fit_baselines(split.train, n_items)
    elif baselines is False:
        bls = []
    else:
        bls = baselines
    # Baselines are fitted on split.train: their scores on these cases never change, so a
    # per-epoch valid evaluation computes them once.
    bkey = {b.name: ("baseline", b.name, which, len(cases), num_negatives, seed, k) for b in bls}
    todo = [b for b in bls if bkey[b.name] not in cache]
    acc = {"model": _Acc(), **{b.name: _Acc() for b in todo}}
    nll = type_hit = 0.0
    t_abs_log = t_sq_log = t_abs_s = t_sq_s = 0.0

    lengths_all = np.asarray([len(c.inputs) for c in cases])
    for idx in _eval_batches(lengths_all, batch_size, token_budget=max(batch_size * 64, 4096)):
        batch = [cases[i] for i in idx]
        item, etype, gap, lengths = pad_inputs(batch)
        dev = torch.device(device)
        y, _ = enc.hidden_seq(torch.from_numpy(item).to(dev), torch.from_numpy(etype).to(dev),
                              torch.from_numpy(gap).to(dev))  # (T, B, H)
        last = torch.from_numpy(lengths - 1).to(dev)
        h = y[last, torch.arange(len(batch), device=dev)]  # (B, H)
        z = enc.z(h).float()  # (B, D)
        logits = enc.item_logits(z).float()  # (B, n_items)
        tgt = torch.from_numpy(targets[idx]).to(dev)
        nll += float(F.cross_entropy(logits, tgt, reduction="sum"))
        acc["model"].add(logits.cpu().numpy(), targets[idx], negs[idx], k)
        ty = torch.tensor([c.target_type for c in batch], device=dev)
        type_hit += float((enc.type_head(z).argmax(-1) == ty).sum())
        pred_log = enc.time_head(z).squeeze(-1).float().cpu().numpy().astype(np.float64)
        true_log = np.asarray([c.target_log_gap for c in batch], dtype=np.float64)
        d_log = pred_log - true_log
        d_s = np.expm1(np.clip(pred_log, 0.0, 30.0)) - np.expm1(true_log)
        t_abs_log += float(np.abs(d_log).sum())
        t_sq_log += float((d_log**2).sum())
        t_abs_s += float(np.abs(d_s).sum())
        t_sq_s += float((d_s**2).sum())
        last_items = item[lengths - 1, np.arange(len(batch))]
        for b in todo:
            acc[b.name].add(b.scores(last_items), targets[idx], negs[idx], k)
    enc.train(was_training)

    n = len(cases)
    out: dict[str, Any] = {"split": which, "n_users": n, "k": k, "num_negatives": num_negatives}
    out["model"] = acc["model"].result(k)
    out["model"].update({
        "item_nll": nll / n,
        "type_acc": type_hit / n,
        "time_mae_log": t_abs_log / n,
        "time_rmse_log": math.sqrt(t_sq_log / n),
        "time_mae_s": t_abs_s / n,
        "time_rmse_s": math.sqrt(t_sq_s / n),
    })
    margins: dict[str, float] = {}
    for b in todo:
        cache[bkey[b.name]] = acc[b.name].result(k)
    for b in bls:
        out[b.name] = copy.deepcopy(cache[bkey[b.name]])
        for proto, ms in out[b.name].items():
            for m, v in ms.items():
                margins[f"{proto}_{m}_vs_{b.name}"] = out["model"][proto][m] / v if v > 0 else math.inf
    if bls:
        out["margins"] = margins
    mean_events = float(np.mean([len(c.inputs) for c in cases]))
    vec_bytes = enc.cfg.z_dim * 4
    ev_bytes = split.info.get("event_json_bytes")
    comp: dict[str, Any] = {"vector_bytes_f32": vec_bytes, "mean_history_events": mean_events}
    if ev_bytes:
        raw = mean_events * ev_bytes
        comp.update({"mean_event_json_bytes": ev_bytes, "mean_history_json_bytes": raw,
                     "compression_ratio": raw / vec_bytes})
    out["compression"] = comp
    return out


def flat(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metrics -> {"model.sampled.hr@10": ...} for logs and curves."""
    out: dict[str, float] = {}
    for key, v in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(v, dict):
            out.update(flat(v, name + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = float(v)
    return out
