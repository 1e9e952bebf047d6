"""Evaluation: one function, one dict, model and baselines on the same cases and candidates.

Protocols (`config.PROTOCOLS`), each reported under its own key:
- sampled: the true next item against `num_negatives` items drawn uniformly from the
  catalogue, rejecting the user's input items and the target (seeded: reruns draw the
  same candidates), as in SASRec;
- full: the true next item ranked against the whole catalogue (padding and OOV excluded);
- full_seen_excluded: the same, less the items in the user's input history (S3-Rec,
  ICLRec). The target itself is always ranked, also when the user had seen it before.
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
from clickvec.training.config import PROTOCOLS
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
    """Sums of per-case metrics for one scorer under the three protocols."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0

    def _sum(self, proto: str, m: dict[str, np.ndarray]) -> None:
        for name, v in m.items():
            self.sums[f"{proto}.{name}"] = self.sums.get(f"{proto}.{name}", 0.0) + float(v.sum())

    def add(self, scores: np.ndarray, targets: np.ndarray, negs: np.ndarray, seen: np.ndarray, k: int) -> None:
        """scores (B, n_items); seen (B, n_items) bool: the user's input items.

        Two passes over the (B, n_items) scores (above and level with the target); the
        seen-excluded counts subtract the few seen items' rows from them, so validating
        tens of thousands of users over a 20k catalogue stays a small part of an epoch."""
        scores = np.asarray(scores)  # the scorer's own dtype: float32 logits compare exactly
        B = len(targets)
        ok = targets >= 2  # an OOV target is a miss in every protocol
        rows = np.arange(B)
        t = scores[rows, np.maximum(targets, 0)]
        cat = scores[:, 2:]
        g_full = np.count_nonzero(cat > t[:, None], axis=1)
        e_full = np.count_nonzero(cat == t[:, None], axis=1) - ok.astype(np.int64)
        r, c = np.nonzero(seen[:, 2:])
        c = c + 2
        keep = ~(ok[r] & (c == targets[r]))  # the target counts apart from the others
        r, c = r[keep], c[keep]
        s_seen, t_seen = scores[r, c], t[r]
        g_ex = g_full - np.bincount(r[s_seen > t_seen], minlength=B)
        e_ex = e_full - np.bincount(r[s_seen == t_seen], minlength=B)
        neg = np.take_along_axis(scores, negs, axis=1)
        self._sum("sampled", _tie_metrics((neg > t[:, None]).sum(1), (neg == t[:, None]).sum(1), k, ok))
        self._sum("full", _tie_metrics(g_full, np.maximum(e_full, 0), k, ok))
        self._sum("full_seen_excluded", _tie_metrics(g_ex, np.maximum(e_ex, 0), k, ok))
        self.n += B

    def result(self, k: int) -> dict[str, dict[str, float]]:
        n = max(self.n, 1)
        out: dict[str, dict[str, float]] = {}
        for proto in PROTOCOLS:
            m = {f"hr@{k}": self.sums.get(f"{proto}.hr", 0.0) / n, f"ndcg@{k}": self.sums.get(f"{proto}.ndcg", 0.0) / n}
            if proto != "sampled":
                m["mrr"] = self.sums.get(f"{proto}.rr", 0.0) / n
            out[proto] = m
        return out


class _Aux:
    """Sums for the figures beside ranking: next-item NLL, and next type and gap only
    where the data has them (a `user item` file has one type and evenly spaced events)."""

    def __init__(self, has_types: bool, has_gaps: bool) -> None:
        self.has_types, self.has_gaps = has_types, has_gaps
        self.s = {"item_nll": 0.0, "type_hit": 0.0, "abs_log": 0.0, "sq_log": 0.0, "abs_s": 0.0, "sq_s": 0.0}

    def add(self, enc: Encoder, z: torch.Tensor, logits: torch.Tensor, batch: Sequence[EvalCase]) -> None:
        dev = z.device
        tgt = torch.tensor([c.target_item for c in batch], device=dev)
        self.s["item_nll"] += float(F.cross_entropy(logits, tgt, reduction="sum"))
        if self.has_types:
            ty = torch.tensor([c.target_type for c in batch], device=dev)
            self.s["type_hit"] += float((enc.type_head(z).argmax(-1) == ty).sum())
        if self.has_gaps:
            pred_log = enc.time_head(z).squeeze(-1).float().cpu().numpy().astype(np.float64)
            true_log = np.asarray([c.target_log_gap for c in batch], dtype=np.float64)
            d_log = pred_log - true_log
            d_s = np.expm1(np.clip(pred_log, 0.0, 30.0)) - np.expm1(true_log)
            self.s["abs_log"] += float(np.abs(d_log).sum())
            self.s["sq_log"] += float((d_log**2).sum())
            self.s["abs_s"] += float(np.abs(d_s).sum())
            self.s["sq_s"] += float((d_s**2).sum())

    def result(self, n: int) -> dict[str, float]:
        s = self.s
        out = {"item_nll": s["item_nll"] / n}
        if self.has_types:
            out["type_acc"] = s["type_hit"] / n
        if self.has_gaps:
            out.update({"time_mae_log": s["abs_log"] / n, "time_rmse_log": math.sqrt(s["sq_log"] / n),
                        "time_mae_s": s["abs_s"] / n, "time_rmse_s": math.sqrt(s["sq_s"] / n)})
        return out


def _recall_last_distinct(scores: torch.Tensor, batch: Sequence[EvalCase], k: int) -> float:
    """Sum over the batch of recall@k of each user's last k distinct input items in the
    top k of `scores` (B, n_items): what the vector retains of the recent history."""
    top = torch.topk(scores[:, 2:], k, dim=-1).indices.cpu().numpy() + 2
    total = 0.0
    for row, c in zip(top, batch, strict=True):
        recent = list(dict.fromkeys(int(i) for i in c.inputs[::-1, 0] if i >= 2))[:k]
        if recent:
            total += len(set(recent) & set(row.tolist())) / len(recent)
    return total


def _baselines(split: Split, baselines: bool | Sequence[Popularity | Markov]) -> Sequence[Popularity | Markov]:
    if baselines is True:
        return fit_baselines(split.train, split.spec.n_items)
    return [] if baselines is False else baselines


def _seen_mask(batch: Sequence[EvalCase], n_items: int) -> np.ndarray:
    seen = np.zeros((len(batch), n_items), dtype=bool)
    for b, c in enumerate(batch):
        seen[b, c.inputs[:, 0]] = True
    return seen


@torch.no_grad()
def _last_z(enc: Encoder, batch: Sequence[EvalCase], device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """z after each case's last input event (B, D) and its last input item (B,)."""
    item, etype, gap, lengths = pad_inputs(batch)
    y, _ = enc.hidden_seq(torch.from_numpy(item).to(device), torch.from_numpy(etype).to(device),
                          torch.from_numpy(gap).to(device))  # (T, B, H)
    last = torch.from_numpy(lengths - 1).to(device)
    h = y[last, torch.arange(len(batch), device=device)]
    return enc.z(h).float(), item[lengths - 1, np.arange(len(batch))]


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

    Returns {"n_users", "protocols", "model": {<protocol>: {hr@k, ndcg@k[, mrr]}, item_nll,
    [type_acc, time_*]}, "<baseline>": {<protocol>: ...}, "margins": model / baseline
    ratios keyed "<protocol>.<metric>_vs_<baseline>", "compression"}.
    """
    cases: list[EvalCase] = list(getattr(split, which))[: max_cases or None]
    if not cases:
        raise ValueError(f"the {which} split is empty: too few users with >= 3 events")
    enc: Encoder = getattr(model, "module", model)  # unwrap DDP
    was_training = enc.training
    enc.eval()
    n_items, dev = split.spec.n_items, torch.device(device)
    cache = split.cache  # candidates and baseline scores depend only on the cases and the seed
    ck = ("negatives", which, len(cases), num_negatives, seed)
    if ck not in cache:
        cache[ck] = sample_negatives(cases, n_items, num_negatives, seed)
    negs = cache[ck]
    targets = np.asarray([c.target_item for c in cases], dtype=np.int64)
    bls = _baselines(split, baselines)
    bkey = {b.name: ("baseline", b.name, which, len(cases), num_negatives, seed, k) for b in bls}
    todo = [b for b in bls if bkey[b.name] not in cache]
    acc = {"model": _Acc(), **{b.name: _Acc() for b in todo}}
    aux = _Aux(split.info.get("has_types", True), split.info.get("has_gaps", True))
    recall_sum = 0.0
    lengths_all = np.asarray([len(c.inputs) for c in cases])
    for idx in _eval_batches(lengths_all, batch_size, token_budget=max(batch_size * 64, 4096)):
        batch = [cases[i] for i in idx]
        z, last_items = _last_z(enc, batch, dev)
        logits = enc.item_logits(z).float()  # (B, n_items)
        seen = _seen_mask(batch, n_items)
        acc["model"].add(logits.cpu().numpy(), targets[idx], negs[idx], seen, k)
        aux.add(enc, z, logits, batch)
        recall_sum += _recall_last_distinct(enc.bag_logits(z) if enc.bag_proj is not None else logits, batch, k)
        for b in todo:
            acc[b.name].add(b.scores(last_items), targets[idx], negs[idx], seen, k)
    enc.train(was_training)

    n = len(cases)
    out: dict[str, Any] = {"split": which, "n_users": n, "k": k, "num_negatives": num_negatives,
                           "protocols": list(PROTOCOLS)}
    out["model"] = {**acc["model"].result(k), **aux.result(n)}
    for b in todo:
        cache[bkey[b.name]] = acc[b.name].result(k)
    for b in bls:
        out[b.name] = copy.deepcopy(cache[bkey[b.name]])
    if bls:
        out["margins"] = margins(out, [b.name for b in bls])
    out["compression"] = compression(enc, split, cases, recall_sum / n, k)
    return out


def margins(metrics: dict[str, Any], baselines: Sequence[str]) -> dict[str, float]:
    """Model / baseline ratio of every ranking figure, keyed "<protocol>.<metric>_vs_<baseline>"."""
    out: dict[str, float] = {}
    for name in baselines:
        for proto in PROTOCOLS:
            for m, v in metrics[name][proto].items():
                out[f"{proto}.{m}_vs_{name}"] = metrics["model"][proto][m] / v if v > 0 else math.inf
    return out


def compression(enc: Encoder, split: Split, cases: Sequence[EvalCase], recall: float, k: int) -> dict[str, Any]:
    """What the vector costs (bytes against the raw history) and retains (recall@k of the
    last k distinct items, from the bag-of-items head when trained, else the next-item scores)."""
    mean_events = float(np.mean([len(c.inputs) for c in cases]))
    vec_bytes = enc.cfg.z_dim * 4
    comp: dict[str, Any] = {"vector_bytes_f32": vec_bytes, "mean_history_events": mean_events,
                            f"recall@{k}_last_{k}_distinct": recall,
                            "recall_head": "bag" if enc.bag_proj is not None else "next_item"}
    ev_bytes = split.info.get("event_json_bytes")
    if ev_bytes:
        raw = mean_events * ev_bytes
        comp.update({"mean_event_json_bytes": ev_bytes, "mean_history_json_bytes": raw,
                     "compression_ratio": raw / vec_bytes})
    return comp


def beats(metrics: dict[str, Any], baseline: str = "markov") -> bool:
    """The model above `baseline` on every headline figure (HR@k, NDCG@k, MRR; all protocols)."""
    return all(metrics["model"][proto][m] > v for proto in PROTOCOLS for m, v in metrics[baseline][proto].items())


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
