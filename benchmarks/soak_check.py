"""The soak's bookkeeping (benchmarks/soak.py): what was delivered per user, and every
vector checked against the offline encoder, in memory bounded by one round of vectors.

The property is the project's end-to-end one (tests/stream_util.py `check_vectors`): the
vector with seq n equals the offline encoder (`Bundle.encode_offline`, the whole prefix
from the zero state in one call) on the user's first n delivered events, max abs
difference <= 1e-5. A soak of 30 minutes cannot keep every vector: vectors wait in
`pending` only until the next round, which re-encodes each affected user's prefix and
drops them. Per user only the delivered events (13 bytes each) and the received seqs as
"all up to k, plus a few above" stay.
"""

from __future__ import annotations

from array import array
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clickvec.contract.messages import DeadLetter, VectorMessage
from clickvec.features import gap_buckets


class Ledger:
    """Each user's delivered events, in partition order (delivery reports of one
    partition come in offset order), as item / type indices and times."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.items: dict[str, array] = defaultdict(lambda: array("i"))
        self.types: dict[str, array] = defaultdict(lambda: array("b"))
        self.ts: dict[str, array] = defaultdict(lambda: array("q"))
        self.total = 0

    def add(self, user: str, item: str, event_type: str, ts: int) -> None:
        self.items[user].append(self.spec.item_index(item))
        self.types[user].append(self.spec.type_index(event_type))
        self.ts[user].append(ts)
        self.total += 1

    def n(self, user: str) -> int:
        return len(self.items[user]) if user in self.items else 0

    def encoded(self, user: str, n: int) -> np.ndarray:
        """The user's first n events as the model's (n, 3) inputs (= FeatureSpec.encode_sequence)."""
        out = np.empty((n, 3), np.int64)
        out[:, 0] = np.frombuffer(self.items[user], np.int32)[:n]
        out[:, 1] = np.frombuffer(self.types[user], np.int8)[:n]
        out[:, 2] = gap_buckets(np.frombuffer(self.ts[user], np.int64)[:n])
        return out


@dataclass
class _Seen:
    upto: int = 0  # every seq 1..upto received
    above: set[int] = field(default_factory=set)

    def add(self, seq: int) -> bool:
        """False if `seq` was received before."""
        if seq <= self.upto or seq in self.above:
            return False
        self.above.add(seq)
        while self.upto + 1 in self.above:
            self.above.remove(self.upto + 1)
            self.upto += 1
        return True

    def distinct(self) -> int:
        return self.upto + len(self.above)


class Verifier:
    """Vectors from the output topic, checked in rounds against the offline encoder."""

    def __init__(self, bundle: Any, ledger: Ledger, tol: float = 1e-5) -> None:
        self.bundle, self.ledger, self.tol = bundle, ledger, tol
        self.pending: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
        self.seen: dict[str, _Seen] = defaultdict(_Seen)
        self.vectors = 0
        self.duplicates = 0  # same (user, seq) again: at-least-once delivery after a crash
        self.checked = 0
        self.wrong: list[tuple[str, int, float]] = []  # differs from the offline encoder
        self.beyond: list[tuple[str, int]] = []  # seq past the user's delivered events
        self.unexpected_users: set[str] = set()
        self.wrong_users: set[str] = set()
        self.max_abs_diff = 0.0

    def add(self, value: bytes) -> None:
        m = VectorMessage.from_bytes(value)
        self.vectors += 1
        if not self.seen[m.user_id].add(m.seq):
            self.duplicates += 1
        self.pending[m.user_id].append((m.seq, np.asarray(m.vector, np.float32)))

    def round(self, final: bool = False) -> int:
        """Check the pending vectors whose events are in the ledger (all of them when
        `final`); return how many were checked."""
        done = 0
        for user in list(self.pending):
            n_sent = self.ledger.n(user)
            if n_sent == 0:
                if final:
                    self.unexpected_users.add(user)
                    del self.pending[user]
                continue
            vecs = self.pending.pop(user)
            ready = [(s, v) for s, v in vecs if s <= n_sent]
            later = [(s, v) for s, v in vecs if s > n_sent]
            if later and not final:  # the delivery report may not have been served yet
                self.pending[user] = later
            elif later:
                self.beyond += [(user, s) for s, _ in later]
                self.wrong_users.add(user)
            if not ready:
                continue
            z = self.bundle.encode_offline(self.ledger.encoded(user, max(s for s, _ in ready)))
            for s, v in ready:
                d = float(np.max(np.abs(v - z[s - 1])))
                self.max_abs_diff = max(self.max_abs_diff, d)
                if d > self.tol:
                    self.wrong.append((user, s, d))
                    self.wrong_users.add(user)
            done += len(ready)
        self.checked += done
        return done

    def complete(self) -> bool:
        """Every delivered event's vector received."""
        return all(self.seen[u].distinct() >= self.ledger.n(u) for u in self.ledger.items)

    def summary(self) -> dict[str, Any]:
        lost = sum(max(0, self.ledger.n(u) - self.seen[u].distinct()) for u in self.ledger.items)
        users = list(self.ledger.items)
        exact = sum(1 for u in users if u not in self.wrong_users and self.seen[u].distinct() == self.ledger.n(u))
        return {"users": len(users), "events_delivered": self.ledger.total, "vectors_received": self.vectors,
                "vectors_checked": self.checked, "lost": lost, "applied_twice": len(self.beyond) + len(self.wrong),
                "beyond_last_event": len(self.beyond), "differs_from_offline": len(self.wrong),
                "same_seq_duplicates": self.duplicates, "exact_users": exact,
                "unexpected_users": len(self.unexpected_users), "max_abs_diff": self.max_abs_diff,
                "examples": {"wrong": self.wrong[:5], "beyond": self.beyond[:5]}}


class DeadLetterCount:
    """Dead letters by their source (topic, partition, offset): distinct and repeated."""

    def __init__(self) -> None:
        self.sources: set[tuple[str, int, int]] = set()
        self.total = 0
        self.reasons: dict[str, int] = defaultdict(int)
        self.truncated = 0

    def add(self, value: bytes) -> None:
        d = DeadLetter.from_bytes(value)
        self.total += 1
        key = (d.topic, d.partition, d.offset)
        if key not in self.sources:
            self.sources.add(key)
            self.reasons[d.reason] += 1
            self.truncated += bool(d.truncated)

    def summary(self) -> dict[str, Any]:
        return {"dead_letters": len(self.sources), "dead_letter_repeats": self.total - len(self.sources),
                "reasons": dict(self.reasons), "truncated": self.truncated}
