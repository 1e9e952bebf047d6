"""The run's own reader of everything the pipeline publishes."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import deque
from typing import Any

from clickvec.contract.messages import DeadLetter, VectorMessage
from clickvec.kafka import PARTITION_EOF

log = logging.getLogger(__name__)

_SOURCE = re.compile(r"^(.*)\[(\d+)\]@(\d+)$")
_TEXT_LIMIT = 100


class Observer(threading.Thread):
    """An independent consumer of the vector, dead-letter, alert and recommendation
    topics (its own group, from the earliest offset): counts everything the pipeline
    published and keeps what the dashboard shows."""

    def __init__(self, conf: dict[str, Any], topics: dict[str, str], group: str, in_topic: str) -> None:
        super().__init__(name="observer", daemon=True)
        self.conf = conf
        self.topics = topics
        self.group = group
        self.in_topic = in_topic
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.finish_event = threading.Event()
        self.finished = threading.Event()
        self.counts = {k: 0 for k in topics}
        self.dead: dict[str, int] = {}
        self.pending: deque[tuple[int, int, int, int]] = deque()  # partition, offset, recv ms, emit ms
        self.surprise: dict[str, deque[float]] = {}
        self.last: dict[str, tuple[float, int, list[float], float]] = {}  # user -> (seen, seq, z, s)
        self.alert_users: set[str] = set()
        self.latest_alerts: deque[str] = deque(maxlen=3)
        self.latest_rec = ""
        self.undecodable = 0
        self.model_ids: set[str] = set()
        self.last_vector_at = 0.0
        self.error: str | None = None
        self._admin: Any = None  # for the end offsets, once finishing

    def run(self) -> None:
        from confluent_kafka import Consumer

        by_name = {v: k for k, v in self.topics.items()}
        c = Consumer({**self.conf, "group.id": self.group, "auto.offset.reset": "earliest",
                      "enable.auto.commit": False, "enable.partition.eof": False,
                      "isolation.level": "read_committed"})
        c.subscribe(list(self.topics.values()))
        finish_deadline = None
        try:
            while not self.stop_event.is_set():
                msgs = c.consume(num_messages=2000, timeout=0.2)
                now_ms = int(time.time() * 1000)
                with self.lock:
                    for m in msgs:
                        err = m.error()
                        if err is not None:
                            if err.code() != PARTITION_EOF:
                                log.debug("observer: %s", err)
                            continue
                        self._handle(by_name[m.topic()], m, now_ms)
                if self.finish_event.is_set() and not msgs:
                    finish_deadline = finish_deadline or time.monotonic() + 30
                    if self._caught_up(c) or time.monotonic() > finish_deadline:
                        break
        except Exception as e:  # noqa: BLE001 - reported in the summary
            self.error = str(e)
            log.exception("observer failed")
        finally:
            c.close()
            self.finished.set()

    def _caught_up(self, c: Any) -> bool:
        """Every assigned partition read to its end offset (one batched ListOffsets
        request: a watermark query per partition costs a round trip each)."""
        from confluent_kafka import TopicPartition
        from confluent_kafka.admin import AdminClient, OffsetSpec

        assignment = c.assignment()
        if len({tp.topic for tp in assignment}) < len(self.topics):
            return False
        if self._admin is None:
            self._admin = AdminClient(self.conf)
        futures = self._admin.list_offsets(
            {TopicPartition(tp.topic, tp.partition): OffsetSpec.latest() for tp in assignment}, request_timeout=10)
        end = {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}
        return all(not end[(tp.topic, tp.partition)] or tp.offset >= end[(tp.topic, tp.partition)]
                   for tp in c.position(assignment))

    def _handle(self, kind: str, m: Any, now_ms: int) -> None:
        self.counts[kind] += 1
        value = m.value() or b""
        if kind == "out":
            self._vector(value, now_ms)
        elif kind == "dlq":
            try:
                reason = DeadLetter.from_bytes(value).reason
            except (ValueError, TypeError, KeyError):
                reason = "?"
            self.dead[reason] = self.dead.get(reason, 0) + 1
        elif kind == "alerts":
            self.alert_users.add((m.key() or b"").decode(errors="replace"))
            self.latest_alerts.appendleft(alert_text(value))
        elif kind == "recs":
            self.latest_rec = recommendation_text(value)

    def _vector(self, value: bytes, now_ms: int) -> None:
        try:
            v = VectorMessage.from_bytes(value)
        except (ValueError, TypeError, KeyError):
            self.undecodable += 1
            return
        self.model_ids.add(v.model_id)
        src = _SOURCE.match(v.source)
        if src and src.group(1) == self.in_topic:
            self.pending.append((int(src.group(2)), int(src.group(3)), now_ms, v.emit_ts))
        q = self.surprise.setdefault(v.user_id, deque(maxlen=3))
        q.append(v.surprise)
        self.last[v.user_id] = (time.monotonic(), v.seq, v.vector, v.surprise)
        self.last_vector_at = time.monotonic()

    def finish(self, timeout: float = 45.0) -> None:
        """Read every topic to its end, then stop."""
        self.finish_event.set()
        self.finished.wait(timeout)
        self.stop_event.set()
        self.join(10)


def _clip(s: str, limit: int = _TEXT_LIMIT) -> str:
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _json(value: bytes) -> dict[str, Any] | None:
    try:
        d = json.loads(value)
    except ValueError:
        return None
    return d if isinstance(d, dict) else None


def alert_text(value: bytes) -> str:
    """An alert message as one short line: who, how strong, why."""
    d = _json(value)
    if d is None:
        return _clip(value[:_TEXT_LIMIT].decode(errors="replace"))
    ev = d.get("evidence") if isinstance(d.get("evidence"), dict) else {}
    score = d.get("score")
    parts = [str(d.get("user_id", "?")),
             f"score {score:.2f}" if isinstance(score, int | float) else "", str(d.get("reason", ""))]
    if "seq" in ev:
        parts.append(f"event #{ev['seq']}")
    if "events_last_minute" in ev:
        parts.append(f"{ev['events_last_minute']} events/min")
    return _clip("  ".join(p for p in parts if p))


def recommendation_text(value: bytes) -> str:
    """A recommendation message as one short line: the user and the first items."""
    d = _json(value)
    if d is None:
        return _clip(value[:_TEXT_LIMIT].decode(errors="replace"))
    items = d.get("items") if isinstance(d.get("items"), list) else []
    more = f" (+{len(items) - 5})" if len(items) > 5 else ""
    return _clip(f"{d.get('user_id', '?')} #{d.get('seq', '?')} → {', '.join(map(str, items[:5]))}{more}")
