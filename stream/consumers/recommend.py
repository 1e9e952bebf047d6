"""`clickvec recommend`: live top-k recommendations from the vector topic.

  clickvec recommend --model models/NAME --brokers HOST:PORT --in user-vectors --k 10

A consumer-group member (see `loop`): each batch of vector messages is
scored against the bundle's item embeddings in one matrix multiply
(`Bundle.score_items`, padding and OOV indices excluded) and each user's top-k is
published as JSON `{user_id, seq, model_id, items, scores}` (key = user id).
Catalogues above `--ann-threshold` items use an approximate inner-product index
(faiss HNSW over [query, 1] . [embedding, bias]) when faiss is installed, else exact
search. `--eval-events FILE` reports the hit rate on each user's next event.

Across a model rollout (clickvec/lifecycle/cutover.py) give both bundles, `--model OLD
--model NEW`: each vector is scored with the bundle of its model id, and after the
cut-over control record only the new model's vectors are taken (the loop follows it).
Vectors of a model without a bundle are skipped and counted; a cut-over to such a model
is said in one warning line.

A tombstone on the vector topic (the user forgotten, or expired from the worker's state)
is passed on: a tombstone (key = user id, null value) on the recommendation topic, so a
reader keeping the latest recommendation per user drops the user's too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clickvec.contract.messages import VectorMessage
from clickvec.errors import ClickvecError
from clickvec.stream.consumers.loop import Record, add_loop_arguments, run_command, start_checks

log = logging.getLogger(__name__)

FIRST_REAL_ITEM = 2  # 0 = padding, 1 = OOV


class ItemIndex:
    """Top-k items for a batch of vectors: exact numpy or approximate (faiss HNSW)."""

    def __init__(self, bundle: Any, ann_threshold: int = 100_000, ef_search: int = 128) -> None:
        self.bundle = bundle
        emb = np.asarray(bundle.item_embeddings[FIRST_REAL_ITEM:], np.float32)  # (N-2, Ei)
        bias = np.asarray(bundle.item_bias[FIRST_REAL_ITEM:], np.float32)
        self.n_items = emb.shape[0]
        self.kind = "exact"
        self._faiss_index = None
        if self.n_items > ann_threshold:
            try:
                import faiss
            except ImportError:
                log.warning("%d items > --ann-threshold %d but faiss is not installed: exact search",
                            self.n_items, ann_threshold)
            else:
                # score = q . e + b = [q, 1] . [e, b]: a pure inner product for the index.
                data = np.ascontiguousarray(np.hstack([emb, bias[:, None]]), np.float32)
                index = faiss.IndexHNSWFlat(data.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efConstruction = 80
                index.add(data)
                index.hnsw.efSearch = ef_search
                self._faiss_index = index
                self.kind = "faiss-hnsw"
        log.info("item index: %s over %d items", self.kind, self.n_items)

    def topk(self, z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) vectors -> item indices (B, k) (bundle index space) and scores (B, k)."""
        k = min(k, self.n_items)
        if self._faiss_index is not None:
            q = self.bundle.item_query(z).astype(np.float32)  # (B, Ei)
            q = np.ascontiguousarray(np.hstack([q, np.ones((len(q), 1), np.float32)]))
            self._faiss_index.hnsw.efSearch = max(self._faiss_index.hnsw.efSearch, k)
            scores, idx = self._faiss_index.search(q, k)
            return idx.astype(np.int64) + FIRST_REAL_ITEM, scores
        s = self.bundle.score_items(z)[:, FIRST_REAL_ITEM:]  # (B, N-2): one matmul per batch
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(s, part, 1)
        order = np.argsort(-ps, axis=1, kind="stable")
        return np.take_along_axis(part, order, 1) + FIRST_REAL_ITEM, np.take_along_axis(ps, order, 1)


def next_items(path: str | Path) -> dict[str, list[str]]:
    """Each user's items in event order from an event file (ties in file order)."""
    from clickvec.eventfile import read_table

    t = read_table(path)
    users = t.column("user_id").to_pylist()
    items = t.column("item_id").to_pylist()
    ts = np.asarray(t.column("ts").to_numpy(zero_copy_only=False), np.int64)
    out: dict[str, list[str]] = {}
    for i in np.lexsort((np.arange(len(ts)), ts)):
        out.setdefault(users[i], []).append(items[i])
    return out


class RecommendHandler:
    """Top-k per vector with the index of the vector's model (one per bundle given)."""

    def __init__(self, indexes: ItemIndex | Sequence[ItemIndex], k: int,
                 eval_items: dict[str, list[str]] | None = None) -> None:
        indexes = [indexes] if isinstance(indexes, ItemIndex) else list(indexes)
        self.indexes = {ix.bundle.model_id: ix for ix in indexes}
        self.k = k
        self.eval_items = eval_items
        self.missing: set[str] = set()  # model ids seen without a bundle (warned once each)
        self.recommended = 0
        self.skipped_model = 0
        self.eval_cases = 0
        self.hits = 0
        self.random_hits = 0.0  # expected hits of k random catalogue items
        self.forgotten = 0  # vector-topic tombstones passed on

    def cutover(self, cut: Any) -> None:
        """A cut-over control record (from the loop): say so once if there is no bundle
        for the new model."""
        if cut.model_id not in self.indexes and cut.model_id not in self.missing:
            self.missing.add(cut.model_id)
            log.warning("cut-over to model %s, which no --model bundle here is for: its vectors are skipped "
                        "(restart with --model NEW_BUNDLE)", cut.model_id[:12])

    def __call__(self, batch: Sequence[VectorMessage]) -> list[Record]:
        by_model: dict[str, list[VectorMessage]] = {}
        for m in batch:
            index = self.indexes.get(m.model_id)
            if index is not None and len(m.vector) == index.bundle.z_dim:
                by_model.setdefault(m.model_id, []).append(m)
                continue
            self.skipped_model += 1
            if index is None and m.model_id not in self.missing:
                self.missing.add(m.model_id)
                log.warning("vectors of model %s, which no --model bundle here is for, are skipped",
                            m.model_id[:12])
        out: list[Record] = []
        for model_id, msgs in by_model.items():
            out += self._recommend(self.indexes[model_id], msgs)
        self.recommended += len(out)
        return out

    def _recommend(self, index: ItemIndex, msgs: list[VectorMessage]) -> list[Record]:
        z = np.asarray([m.vector for m in msgs], np.float32)  # (B, D)
        idx, scores = index.topk(z, self.k)
        spec = index.bundle.spec
        out: list[Record] = []
        for m, row, sc in zip(msgs, idx, scores, strict=True):
            items = [spec.index_to_item(int(i)) for i in row]
            rec = {"user_id": m.user_id, "seq": m.seq, "model_id": m.model_id,
                   "items": items, "scores": [round(float(s), 5) for s in sc]}
            out.append((m.user_id.encode(), json.dumps(rec, separators=(",", ":")).encode()))
            if self.eval_items is not None:
                seq = self.eval_items.get(m.user_id, [])
                if m.seq < len(seq):  # the user's (seq+1)-th event is held back
                    self.eval_cases += 1
                    self.hits += seq[m.seq] in items
                    self.random_hits += len(items) / index.n_items
        return out

    def forget(self, user_id: str) -> list[Record]:
        """A vector-topic tombstone: drop the user's held-back events and pass the
        tombstone on."""
        if self.eval_items is not None:
            self.eval_items.pop(user_id, None)
        self.forgotten += 1
        return [(user_id.encode(), None)]

    def evaluation(self) -> dict[str, Any]:
        n = self.eval_cases
        return {"cases": n, "hits": self.hits, "hit_rate": self.hits / n if n else None,
                "random_items_hit_rate": self.random_hits / n if n else None, "k": self.k}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clickvec recommend", description=__doc__.split("\n\n")[0])
    add_loop_arguments(p, "recommendations", "clickvec-recommend")
    p.add_argument("--model", required=True, type=Path, action="append",
                   help="model bundle directory; repeat for each model on the topic (across a rollout)")
    p.add_argument("--k", type=int, default=10, help="items per recommendation (default %(default)s)")
    p.add_argument("--ann-threshold", type=int, default=100_000,
                   help="approximate index above this many items (default %(default)s)")
    p.add_argument("--eval-events", type=Path, default=None,
                   help="event file: hit rate of each recommendation on the user's next event")
    p.add_argument("--trust", default=os.environ.get("CLICKVEC_TRUST") or None,
                   help="public key file (Ed25519 PEM): refuse a bundle unless signed by this key "
                        "(env CLICKVEC_TRUST; default: no signature needed)")
    args = p.parse_args(argv)
    if args.k < 1:
        raise SystemExit("--k must be >= 1")

    def load() -> Any:
        from clickvec.bundle.reader import load_bundle

        if args.eval_events is not None and not args.eval_events.is_file():
            raise ClickvecError(f"the events file {str(args.eval_events)!r} (--eval-events) does not exist")
        return [load_bundle(path, providers="cpu", warmup=False, trust=args.trust) for path in args.model]

    started = start_checks("clickvec recommend", args, load)  # the bundles before any connection
    if isinstance(started, int):
        return started
    loop, bundles = started
    indexes = [ItemIndex(bundle, args.ann_threshold) for bundle in bundles]
    handler = RecommendHandler(indexes, args.k, next_items(args.eval_events) if args.eval_events else None)
    log.info("recommend config: %s k=%d index=%s model_ids=%s", loop.describe(), args.k, indexes[0].kind,
             [b.model_id[:12] for b in bundles])

    def results() -> dict[str, Any]:
        out: dict[str, Any] = {"recommended": handler.recommended,
                               "skipped_other_model": handler.skipped_model, "forgotten": handler.forgotten}
        if handler.eval_items is not None:
            out["evaluation"] = handler.evaluation()
        return out

    config = {**loop.describe(), "k": args.k, "index": indexes[0].kind,
              "model": str(args.model[0]) if len(args.model) == 1 else [str(m) for m in args.model]}
    return run_command("clickvec recommend", loop, handler, args.summary, config, results)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
