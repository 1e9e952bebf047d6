"""`clickvec compare`: two model bundles on the same evaluation data, before a rollout.

  clickvec compare models/OLD models/NEW --data events.parquet [--split loo|time] [--json]

Both bundles rank the next item of the same cases: the split is the training's own
(clickvec/training/data.py `make_split`, leave-one-out by default: each user's last event
is the target, the events before it the input), each case's events encoded with each
bundle's own vocabulary. The vector after the last input event (the bundle's step graph,
ONNX Runtime, as the stream computes it) scores the whole catalogue; the target's rank
gives HR@10 and NDCG@10 under the training report's protocols `full` and
`full_seen_excluded` (the user's input items left out), ties counted by their expectation
as clickvec/training/evaluate.py does. A target outside a bundle's vocabulary is a miss
for that bundle.

`clickvec rollout --compare-data FILE` runs this before the cut-over and refuses when the
new model is worse on NDCG@10 (`full_seen_excluded`) unless `--accept-drift`.
Torch-free.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from clickvec.errors import ClickvecError

PROTOCOLS = ("full", "full_seen_excluded")  # clickvec/training/config.py PROTOCOLS, less "sampled"
HEADLINE = ("full_seen_excluded", "ndcg")  # what decides "worse"


class CompareError(ClickvecError):
    """The bundles could not be compared. Action: check --data (an event file with users
    of at least 3 events) and the bundle paths; the message names the cause."""


def tie_metrics(greater: np.ndarray, ties: np.ndarray, k: int, hit_ok: np.ndarray) -> dict[str, np.ndarray]:
    """Expected HR@k and NDCG@k per case when the target's 0-based rank is uniform over
    [greater, greater + ties] (as clickvec/training/evaluate.py `_tie_metrics`)."""
    n = int((greater + ties).max()) + 2 if len(greater) else 2
    pos = np.arange(n)
    cum_d = np.concatenate([[0.0], np.cumsum(np.where(pos < k, 1.0 / np.log2(pos + 2.0), 0.0))])
    cum_h = np.concatenate([[0.0], np.cumsum((pos < k).astype(np.float64))])
    lo, hi, m = greater, greater + ties + 1, ties + 1.0
    ok = hit_ok.astype(np.float64)
    return {"hr": ok * (cum_h[hi] - cum_h[lo]) / m, "ndcg": ok * (cum_d[hi] - cum_d[lo]) / m}


def rank_metrics(scores: np.ndarray, targets: np.ndarray, seen: list[np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Per-case metrics of (B, n_items) scores; `seen`: each case's input item indices."""
    scores = np.asarray(scores, np.float64)
    B = len(targets)
    rows = np.arange(B)
    ok = targets >= 2  # an OOV target is a miss
    t = scores[rows, np.maximum(targets, 0)]
    cat = scores[:, 2:]
    above, level = cat > t[:, None], cat == t[:, None]
    unseen = np.ones_like(cat, dtype=bool)
    for b, items in enumerate(seen):
        unseen[b, items[items >= 2] - 2] = False
    unseen[rows[ok], targets[ok] - 2] = False  # the target counts apart from the others
    out: dict[str, np.ndarray] = {}
    for proto, g, e in (("full", above.sum(1), np.maximum(level.sum(1) - ok, 0)),
                        ("full_seen_excluded", (above & unseen).sum(1), (level & unseen).sum(1))):
        for name, v in tie_metrics(g, e, k, ok).items():
            out[f"{proto}.{name}"] = v
    return out


def evaluation_cases(data: str | Path, split: str = "loo") -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """The histories and the test cases (user, number of input events) of the training's split."""
    from clickvec.training.data import make_split
    from clickvec.training.readers import load_histories

    try:
        histories = load_histories(str(data))
        cases = make_split(histories, kind=split).test
    except (OSError, ValueError, KeyError) as e:
        raise CompareError(f"evaluation data {data}: {e}") from None
    if not cases:
        raise CompareError(f"evaluation data {data}: no evaluation cases (no user with at least 3 events)")
    return histories, [(c.user, len(c.inputs)) for c in cases]


def score_bundle(bundle: Any, histories: dict[str, Any], cases: list[tuple[str, int]], k: int = 10,
                 batch: int = 256) -> dict[str, float]:
    """Mean HR@k / NDCG@k of one bundle over the cases, by the step graph on each input."""
    sums: dict[str, float] = {}
    order = sorted(range(len(cases)), key=lambda i: cases[i][1])  # similar lengths share a batch
    for lo in range(0, len(order), batch):
        part = [cases[i] for i in order[lo:lo + batch]]
        encs = []
        for user, n_in in part:
            h = histories[user]
            encs.append(bundle.spec.encode_sequence(h.items[:n_in + 1], h.types[:n_in + 1], h.ts[:n_in + 1]))
        lengths = np.array([n for _, n in part], np.int32)
        T, B = int(lengths.max()), len(part)
        x = np.zeros((3, T, B), np.int64)
        for b, enc in enumerate(encs):
            x[:, : lengths[b], b] = enc[: lengths[b]].T
        h0, c0 = bundle.zero_state(B)
        _, _, _, z_last, _ = bundle.step(x[0], x[1], x[2], lengths, h0, c0)
        targets = np.array([enc[n, 0] for enc, n in zip(encs, lengths, strict=True)], np.int64)
        seen = [enc[:n, 0] for enc, n in zip(encs, lengths, strict=True)]
        for name, v in rank_metrics(bundle.score_items(z_last), targets, seen, k).items():
            sums[name] = sums.get(name, 0.0) + float(v.sum())
    return {name: s / len(cases) for name, s in sums.items()}


def compare(old: Any, new: Any, data: str | Path, split: str = "loo", k: int = 10) -> dict[str, Any]:
    """Both bundles (loaded) on the same cases: their metrics, new - old, and whether the
    new one is worse on the headline NDCG@k."""
    histories, cases = evaluation_cases(data, split)
    result: dict[str, Any] = {"data": str(data), "split": split, "cases": len(cases), "k": k}
    metrics = {}
    for role, b in (("old", old), ("new", new)):
        m = score_bundle(b, histories, cases, k)
        metrics[role] = m
        result[role] = {"model_id": b.model_id, **{p: {f"hr@{k}": round(m[f"{p}.hr"], 5),
                                                        f"ndcg@{k}": round(m[f"{p}.ndcg"], 5)} for p in PROTOCOLS}}
    result["delta"] = {p: {f"{n}@{k}": round(metrics["new"][f"{p}.{n}"] - metrics["old"][f"{p}.{n}"], 5)
                           for n in ("hr", "ndcg")} for p in PROTOCOLS}
    proto, name = HEADLINE
    result["headline"] = f"{proto}.{name}@{k}"
    result["worse"] = bool(metrics["new"][f"{proto}.{name}"] < metrics["old"][f"{proto}.{name}"])
    return result


def compare_paths(old_path: str | Path, new_path: str | Path, data: str | Path, split: str = "loo",
                  k: int = 10) -> dict[str, Any]:
    """`compare` on bundle directories (verified and loaded here, CPU)."""
    from clickvec.bundle.reader import load_bundle

    old = load_bundle(old_path, providers="cpu", warmup=False)
    new = load_bundle(new_path, providers="cpu", warmup=False)
    return compare(old, new, data, split, k)


def against_training(old_path: str | Path, data: str | Path, split: str, test_metrics: dict[str, Any],
                     k: int = 10) -> dict[str, Any]:
    """For a training report (`clickvec train --compare-with OLD_BUNDLE`): the old bundle on
    the test cases of the training's own split of `data`, beside the new model's test
    metrics (`training.evaluate.evaluate(...)`, whose "model" holds {protocol: {hr@k,
    ndcg@k}}) as `compare`'s result, so `markdown` renders it. The same cases: both come
    from `make_split(data, split)`."""
    from clickvec.bundle.reader import load_bundle

    old = load_bundle(old_path, providers="cpu", warmup=False)
    histories, cases = evaluation_cases(data, split)
    m = score_bundle(old, histories, cases, k)
    new = test_metrics["model"]
    r: dict[str, Any] = {"data": str(data), "split": split, "cases": len(cases), "k": k,
                         "old": {"model_id": old.model_id, **{p: {f"hr@{k}": round(m[f"{p}.hr"], 5),
                                                                  f"ndcg@{k}": round(m[f"{p}.ndcg"], 5)}
                                                              for p in PROTOCOLS}},
                         "new": {"model_id": "this run", **{p: {n: round(float(new[p][n]), 5)
                                                                for n in (f"hr@{k}", f"ndcg@{k}")} for p in PROTOCOLS}}}
    r["delta"] = {p: {n: round(r["new"][p][n] - r["old"][p][n], 5) for n in (f"hr@{k}", f"ndcg@{k}")}
                  for p in PROTOCOLS}
    proto, name = HEADLINE
    r["headline"] = f"{proto}.{name}@{k}"
    r["worse"] = bool(r["delta"][proto][f"{name}@{k}"] < 0)
    return r


def markdown(r: dict[str, Any]) -> str:
    """The comparison as a small table (for the terminal and a training report)."""
    k = r["k"]
    lines = [f"Model comparison on `{r['data']}` ({r['split']} split, {r['cases']} cases, same cases for both)",
             "", f"| protocol | metric | old `{r['old']['model_id'][:12]}` | new `{r['new']['model_id'][:12]}` | "
             "new - old |", "|---|---|---|---|---|"]
    for p in PROTOCOLS:
        for n in (f"hr@{k}", f"ndcg@{k}"):
            lines.append(f"| {p} | {n.upper()} | {r['old'][p][n]:.4f} | {r['new'][p][n]:.4f} | "
                         f"{r['delta'][p][n]:+.4f} |")
    lines += ["", f"The new model is {'WORSE' if r['worse'] else 'not worse'} on {r['headline']}."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clickvec compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", help="the model bundle in service")
    p.add_argument("new", help="the model bundle to roll out")
    p.add_argument("--data", required=True, help="evaluation events (parquet/jsonl/csv or a sequence file)")
    p.add_argument("--split", choices=("loo", "time"), default="loo", help="as the training's (default %(default)s)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    try:
        r = compare_paths(args.old, args.new, args.data, args.split, args.k)
    except (ClickvecError, ValueError, OSError) as e:
        print(f"clickvec compare: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r) if args.json else markdown(r))
    return 0
