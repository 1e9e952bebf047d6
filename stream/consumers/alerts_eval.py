"""Offline evaluation of `clickvec alerts` against the synthetic labels.

`evaluate_alerts` counts precision, recall and time to alert of a set of alerts;
`compare_with_rate_baseline` scores vector messages with the live `AlertScorer` and
compares it, at matched recall over a sweep of thresholds, with the events-per-minute
rule (`rate_baseline_series`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clickvec.contract.messages import VectorMessage
from clickvec.stream.consumers.alerts import AlertConfig, AlertScorer, Scored

DEFAULT_ALERTS = AlertConfig()  # the live command's defaults


def _anomaly_labels(labels: Any) -> tuple[dict[str, int], set[str]]:
    """A synth table (label column) or (anomalies dict, all users) -> both."""
    if isinstance(labels, tuple):
        anomalous, users = labels
        return dict(anomalous), set(users)
    from clickvec.devtools.synth import anomalies

    return anomalies(labels), {str(u) for u in labels.column("user_id").to_pylist()}


def evaluate_alerts(alerts: Iterable[Any], labels: Any) -> dict[str, Any]:
    """Precision, recall and time to alert of `alerts` against the synthetic labels.

    `alerts`: `Scored` items (those with `.alert`), alert JSON dicts, or (user, event_ts)
    pairs. `labels`: a synth table or (user -> first anomalous ts, all users).
    An alert on an anomalous user at or after its first anomalous event is a true
    positive; any other alert is a false positive. Recall is per anomalous user.
    """
    anomalous, users = _anomaly_labels(labels)
    tp = fp = 0
    first_hit: dict[str, int] = {}
    for a in alerts:
        if isinstance(a, Scored):
            if not a.alert:
                continue
            u, ts = a.user_id, a.event_ts
        elif isinstance(a, Mapping):
            u, ts = a["user_id"], int(a["evidence"]["event_ts"])
        else:
            u, ts = a
        t_anom = anomalous.get(u)
        if t_anom is not None and ts >= t_anom:
            tp += 1
            first_hit[u] = min(ts, first_hit.get(u, ts))
        else:
            fp += 1
    delays = np.asarray([first_hit[u] - anomalous[u] for u in first_hit], dtype=np.float64) / 1000.0
    return {
        "alerts": tp + fp,
        "true_positives": tp,
        "false_positives": fp,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": len(first_hit) / len(anomalous) if anomalous else 0.0,
        "anomalous_users": len(anomalous),
        "users": len(users),
        "time_to_alert_s": {
            "median": float(np.median(delays)) if delays.size else None,
            "p90": float(np.percentile(delays, 90)) if delays.size else None,
        },
    }


@dataclass
class ScoreSeries:
    """Per-user event times and scores in seq order, to sweep thresholds offline."""

    by_user: dict[str, tuple[np.ndarray, np.ndarray]]  # user -> (event_ts, score)

    @classmethod
    def of(cls, rows: Iterable[tuple[str, int, float]]) -> ScoreSeries:
        tmp: dict[str, tuple[list[int], list[float]]] = {}
        for u, ts, s in rows:
            t = tmp.setdefault(u, ([], []))
            t[0].append(ts)
            t[1].append(s)
        return cls({u: (np.asarray(t, np.int64), np.asarray(s, np.float64)) for u, (t, s) in tmp.items()})

    def alerts(self, threshold: float, cooldown_ms: int, min_events: int = 1) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        for u, (ts, s) in self.by_user.items():
            last = None
            for i in np.flatnonzero(s >= threshold):
                if i + 1 < min_events:
                    continue
                if last is None or ts[i] - last >= cooldown_ms:
                    out.append((u, int(ts[i])))
                    last = ts[i]
        return out


def rate_baseline_series(messages: Iterable[VectorMessage], window_ms: int = 60_000) -> ScoreSeries:
    """The rule baseline: the user's events in the last `window_ms` of event time."""
    times: dict[str, deque[int]] = {}
    last_seq: dict[str, int] = {}
    rows = []
    for m in messages:
        if m.seq <= last_seq.get(m.user_id, 0):
            continue  # replayed vector
        last_seq[m.user_id] = m.seq
        q = times.setdefault(m.user_id, deque())
        q.append(m.event_ts)
        while q[0] <= m.event_ts - window_ms:
            q.popleft()
        rows.append((m.user_id, m.event_ts, float(len(q))))
    return ScoreSeries.of(rows)


def sweep(series: ScoreSeries, labels: Any, cooldown_ms: int = AlertConfig.cooldown_ms,
          min_events: int = 1, n_thresholds: int = 120) -> list[dict[str, float]]:
    """Precision and recall over thresholds (quantiles of the scores seen)."""
    allv = np.concatenate([s for _, s in series.by_user.values()])
    qs = np.unique(np.quantile(allv, np.linspace(0.5, 1.0, n_thresholds)))
    lab = _anomaly_labels(labels)
    curve = []
    for th in qs:
        r = evaluate_alerts(series.alerts(float(th), cooldown_ms, min_events), lab)
        curve.append({"threshold": float(th), "precision": r["precision"], "recall": r["recall"],
                      "alerts": r["alerts"]})
    return curve


def precision_at_recall(curve: Sequence[Mapping[str, float]], recall: float) -> float:
    """Best precision among thresholds whose recall is at least `recall` (0 if none)."""
    ok = [c["precision"] for c in curve if c["recall"] >= recall - 1e-9 and c["alerts"] > 0]
    return max(ok) if ok else 0.0


def compare_with_rate_baseline(messages: Sequence[VectorMessage], labels: Any,
                               cfg: AlertConfig = DEFAULT_ALERTS,
                               recalls: Sequence[float] = (0.5, 0.8, 0.9, 1.0)) -> dict[str, Any]:
    """Detector at its operating threshold, and both detectors' precision at matched recall."""
    lab = _anomaly_labels(labels)
    sc = AlertScorer(cfg)
    scored = [sc.score(m) for m in messages]
    op = evaluate_alerts(scored, lab)
    det = sweep(ScoreSeries.of((r.user_id, r.event_ts, r.score) for r in scored if not r.replay), lab, cfg.cooldown_ms,
                cfg.min_events)
    base = sweep(rate_baseline_series(messages, cfg.rate_window_ms), lab, cfg.cooldown_ms)
    # The operating threshold is a point of the detector's curve too (the sweep's
    # quantile thresholds may step over it); exact recall values, no rounding up.
    det.append({"threshold": cfg.threshold, "precision": op["precision"], "recall": op["recall"],
                "alerts": op["alerts"]})
    levels = sorted({float(op["recall"]), *recalls})
    return {
        "operating": op,
        "threshold": cfg.threshold,
        "precision_at_recall": {
            f"{r:.3f}": {"detector": precision_at_recall(det, r),
                         "rate_baseline": precision_at_recall(base, r)}
            for r in levels
        },
        "operating_recall": op["recall"],
    }
