"""A user's latest vector, looked up: from Redis (what `clickvec serve-redis` keeps) or
straight from a vector topic (read to its end, the last vector per user kept).

    from clickvec.client.lookup import RedisLookup, TopicLookup
    RedisLookup("redis://127.0.0.1:6379/0").get("u42")      # -> LatestVector | None
    TopicLookup("127.0.0.1:9092", "user-vectors").get("u42")

`TopicLookup` reads the whole topic once (then `refresh()` reads what was added): meant
for a compacted latest-vector topic or for tools, not for serving traffic. It follows
cut-over control records as `clickvec serve-redis` does (clickvec/lifecycle/cutover.py).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from clickvec.contract.messages import VectorMessage

DEFAULT_PREFIX = "cv:"  # clickvec/lifecycle/redis_sink.py DEFAULT_PREFIX


@dataclass(frozen=True)
class LatestVector:
    user_id: str
    model_id: str
    seq: int  # events applied to the user when this vector was made
    event_ts: int  # epoch ms of the event that produced it
    vector: np.ndarray  # float32 (D,)
    surprise: float = 0.0
    emit_ts: int = 0


class RedisLookup:
    """Latest vectors from the hashes `clickvec serve-redis` writes (`<prefix>u:<user>`)."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = DEFAULT_PREFIX,
                 client: Any = None) -> None:
        try:
            import redis
        except ImportError:
            raise ImportError("RedisLookup needs redis-py: pip install 'clickvec[serve]'") from None

        self.client = client if client is not None else redis.Redis.from_url(url)
        self.prefix = prefix

    @staticmethod
    def _decode(user_id: str, h: dict[bytes, bytes]) -> LatestVector | None:
        if not h:
            return None
        return LatestVector(user_id, h[b"model_id"].decode(), int(h[b"seq"]), int(h[b"event_ts"]),
                            np.frombuffer(h[b"vector"], dtype="<f4"), float(h.get(b"surprise", 0.0)),
                            int(h.get(b"emit_ts", 0)))

    def get(self, user_id: str) -> LatestVector | None:
        return self._decode(user_id, self.client.hgetall(f"{self.prefix}u:{user_id}"))

    def get_many(self, user_ids: list[str]) -> list[LatestVector | None]:
        """One round trip for all of them."""
        pipe = self.client.pipeline(transaction=False)
        for u in user_ids:
            pipe.hgetall(f"{self.prefix}u:{u}")
        return [self._decode(u, h) for u, h in zip(user_ids, pipe.execute(), strict=True)]


class TopicLookup:
    """Latest vectors read from a vector topic (or a compacted latest-vector topic)."""

    def __init__(self, bootstrap: str, topic: str, config: dict[str, Any] | None = None,
                 timeout: float = 60.0) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        from clickvec.lifecycle.cutover import ModelFollower

        self.topic = topic
        self.timeout = timeout
        self.latest: dict[str, LatestVector] = {}
        self.follower = ModelFollower()
        self._consumer = Consumer({"bootstrap.servers": bootstrap, **(config or {}),
                                   "group.id": f"clickvec-lookup-{uuid.uuid4().hex}",
                                   "enable.auto.commit": False, "auto.offset.reset": "earliest",
                                   "isolation.level": "read_committed"})
        md = self._consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if md is None or md.error is not None:
            self._consumer.close()
            raise LookupError(f"topic {topic!r} does not exist on {bootstrap}")
        self._parts = sorted(md.partitions)
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in self._parts])
        self._pos = {p: 0 for p in self._parts}
        self.refresh()

    def refresh(self) -> int:
        """Read what was added since the last read, up to the end offsets now; how many messages."""
        from confluent_kafka import TopicPartition

        from clickvec.lifecycle.cutover import Cutover, is_control

        c = self._consumer
        ends = {p: c.get_watermark_offsets(TopicPartition(self.topic, p), timeout=self.timeout)[1]
                for p in self._parts}
        todo = {p for p in self._parts if self._pos[p] < ends[p]}
        n, deadline = 0, time.monotonic() + self.timeout
        while todo and time.monotonic() < deadline:
            for m in c.consume(num_messages=10_000, timeout=0.5):
                if m.error() is not None:
                    continue
                p, key, value = m.partition(), m.key(), m.value()
                self._pos[p] = m.offset() + 1
                if self._pos[p] >= ends[p]:
                    todo.discard(p)
                n += 1
                if value is None:
                    if key is not None:
                        self.latest.pop(key.decode("utf-8", "replace"), None)
                elif is_control(key):
                    self.follower.control(p, Cutover.from_bytes(value))
                else:
                    try:
                        msg = VectorMessage.from_bytes(value)
                    except (ValueError, TypeError, KeyError):
                        continue
                    if self.follower.accept(p, msg):
                        self.latest[msg.user_id] = LatestVector(
                            msg.user_id, msg.model_id, msg.seq, msg.event_ts,
                            np.asarray(msg.vector, dtype=np.float32), float(msg.surprise), msg.emit_ts)
        if todo:
            raise TimeoutError(f"{self.topic}: partitions {sorted(todo)} not read to their end in {self.timeout}s")
        return n

    def get(self, user_id: str) -> LatestVector | None:
        return self.latest.get(user_id)

    def close(self) -> None:
        self._consumer.close()
