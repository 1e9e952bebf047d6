"""Baselines scored on the same split and the same candidates as the model.

- popularity: item counts in the training sequences;
- Markov: first-order item -> next-item transition counts from the training sequences,
  ties (and unseen last items) broken by popularity.
Both are fitted on `Split.train`, exactly what the model learns from.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class Popularity:
    name = "popularity"

    def __init__(self, train: Sequence[np.ndarray], n_items: int) -> None:
        counts = np.zeros(n_items, dtype=np.float64)
        for s in train:
            np.add.at(counts, s[:, 0].astype(np.int64), 1.0)
        self.counts = counts

    def scores(self, last_items: np.ndarray) -> np.ndarray:
        """(B,) last input item -> (B, n_items) scores."""
        return np.broadcast_to(self.counts, (len(last_items), len(self.counts))).copy()


class Markov:
    name = "markov"

    def __init__(self, train: Sequence[np.ndarray], n_items: int) -> None:
        self.n_items = n_items
        pairs = [np.stack([s[:-1, 0], s[1:, 0]], axis=1).astype(np.int64) for s in train if len(s) > 1]
        p = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
        key = p[:, 0] * n_items + p[:, 1]
        uniq, cnt = np.unique(key, return_counts=True)
        self.src = uniq // n_items
        self.dst = uniq % n_items
        self.cnt = cnt.astype(np.float64)
        # CSR row pointers over the sorted source index.
        self.indptr = np.searchsorted(self.src, np.arange(n_items + 1))
        pop = Popularity(train, n_items).counts
        # Popularity only breaks ties: scaled below the smallest transition count step.
        self.tiebreak = pop / (pop.max() + 1.0) if pop.size else pop

    def scores(self, last_items: np.ndarray) -> np.ndarray:
        out = np.broadcast_to(self.tiebreak, (len(last_items), self.n_items)).copy()
        for b, a in enumerate(np.asarray(last_items, dtype=np.int64)):
            lo, hi = self.indptr[a], self.indptr[a + 1]
            out[b, self.dst[lo:hi]] += self.cnt[lo:hi]
        return out


def fit_baselines(train: Sequence[np.ndarray], n_items: int) -> list[Popularity | Markov]:
    return [Popularity(train, n_items), Markov(train, n_items)]
