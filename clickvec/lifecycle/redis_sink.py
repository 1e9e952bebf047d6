"""`clickvec serve-redis`: keep every user's latest vector in Redis.

  clickvec serve-redis --brokers HOST:PORT --in user-vectors --redis redis://127.0.0.1:6379/0

A consumer-group member of the vector topic (stream/consumers/loop.py's loop: a batch is
written to Redis before its offsets are committed, so a crash re-reads it). Per user one
hash, `<prefix>u:<user_id>` (prefix `cv:`), with the fields

  model_id  the model that produced the vector
  seq       events applied to the user (the vector message's seq)
  event_ts  epoch ms of the event that produced it
  emit_ts   epoch ms when the worker produced it
  surprise  how surprising that event was
  vector    the vector, raw little-endian float32 (dim = bytes / 4)

written only when the vector is newer (a higher seq) than the stored one of the same
model: duplicates and out-of-order re-reads never move a user back. A tombstone (a null
value) deletes the user's hash. Cut-over control records (clickvec/lifecycle/cutover.py)
are followed: after one, only vectors of its model are written, and the active model per
vector-topic partition is kept in Redis (`<prefix>active`), so a restarted sink follows
it too. Needs the `serve` extra (redis-py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from clickvec.contract.messages import VectorMessage
from clickvec.errors import ClickvecError
from clickvec.lifecycle.cutover import Cutover, ModelFollower, is_control
from clickvec.stream.consumers.loop import (
    LoopConfig,
    VectorTopicLoop,
    add_loop_arguments,
    loop_config,
    write_summary,
)

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "cv:"
# KEYS[1] user hash; ARGV model, seq, event_ts, emit_ts, surprise, vector. 1 if written.
_PUT_LATEST = """
local cur = redis.call('HMGET', KEYS[1], 'model_id', 'seq')
if cur[1] == ARGV[1] and tonumber(cur[2]) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'model_id', ARGV[1], 'seq', ARGV[2], 'event_ts', ARGV[3],
           'emit_ts', ARGV[4], 'surprise', ARGV[5], 'vector', ARGV[6])
return 1
"""


class RedisSinkError(ClickvecError):
    """Redis could not be reached or refused a write. Action: check --redis (URL,
    password, database); the batch's offsets were not committed, so a restart re-reads it."""


def user_key(prefix: str, user_id: str) -> str:
    return f"{prefix}u:{user_id}"


def connect(url: str) -> Any:
    try:
        import redis
    except ImportError:
        raise RedisSinkError("the redis package is missing: pip install 'clickvec[serve]'") from None
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.RedisError as e:
        raise RedisSinkError(f"cannot use Redis at {url}: {e}") from None
    return client


@dataclass
class SinkStats:
    written: int = 0
    stale: int = 0  # not newer than what Redis holds
    other_model: int = 0  # vectors of a model other than the active one
    deleted: int = 0
    controls: int = 0


class RedisLatest:
    """Writes a batch's vectors, tombstones and control records to Redis in one pipeline."""

    def __init__(self, client: Any, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self.put = client.register_script(_PUT_LATEST)
        active = client.hgetall(f"{prefix}active")
        self.follower = ModelFollower({int(p): m.decode() for p, m in active.items()})
        self.stats = SinkStats()

    def write(self, items: Sequence[tuple[int, bytes | None, VectorMessage | Cutover | None]]) -> None:
        """(vector-topic partition, key, decoded value) in topic order; None: a tombstone."""
        pipe = self.client.pipeline(transaction=False)
        kinds: list[bool] = []  # True: a put whose result counts
        for partition, key, item in items:
            if isinstance(item, Cutover):
                self.follower.control(partition, item)
                pipe.hset(f"{self.prefix}active", str(partition), item.model_id)
                self.stats.controls += 1
                kinds.append(False)
            elif item is None:
                if key is not None:
                    pipe.delete(user_key(self.prefix, key.decode("utf-8", "replace")))
                    self.stats.deleted += 1
                    kinds.append(False)
            else:
                want = self.follower.active.get(partition)
                if want is not None and item.model_id != want:
                    self.stats.other_model += 1
                    continue
                vec = np.asarray(item.vector, dtype="<f4").tobytes()
                self.put(keys=[user_key(self.prefix, item.user_id)],
                         args=[item.model_id, item.seq, item.event_ts, item.emit_ts, repr(float(item.surprise)),
                               vec], client=pipe)
                kinds.append(True)
        if not kinds:
            return
        import redis

        try:
            results = pipe.execute()
        except redis.RedisError as e:
            raise RedisSinkError(f"Redis write failed: {e}") from None
        done = sum(1 for counted, r in zip(kinds, results, strict=True) if counted and r == 1)
        self.stats.written += done
        self.stats.stale += sum(kinds) - done


class RedisSinkLoop(VectorTopicLoop):
    """The vector-topic loop, with control records and tombstones handed to the sink in
    topic order along with the vectors."""

    def __init__(self, cfg: LoopConfig, sink: RedisLatest) -> None:
        super().__init__(cfg, lambda _msgs: [])
        self.sink = sink
        self.follower = sink.follower  # one view of the active models: Redis's and the commits'

    def _decode(self, msgs: list[Any]) -> tuple[list[VectorMessage], dict[tuple[str, int], int]]:
        items: list[tuple[int, bytes | None, VectorMessage | Cutover | None]] = []
        ends: dict[tuple[str, int], int] = {}
        for m in self._readable(msgs, ends):
            try:
                if m.value() is None:
                    items.append((m.partition(), m.key(), None))
                elif is_control(m.key()):
                    items.append((m.partition(), m.key(), Cutover.from_bytes(m.value())))
                else:
                    items.append((m.partition(), m.key(), VectorMessage.from_bytes(m.value())))
            except (ValueError, TypeError, KeyError) as e:
                self.stats.undecodable += 1
                log.warning("skipping undecodable message %s[%d] offset=%d: %s", m.topic(), m.partition(),
                            m.offset(), e)
        self.sink.write(items)  # before the loop commits `ends`
        self.stats.decoded += sum(1 for _, _, item in items if isinstance(item, VectorMessage))
        return [], ends  # nothing for the loop's handler: the batch is in Redis


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clickvec serve-redis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loop_arguments(p, out_default="", group_default="clickvec-serve-redis")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis URL (default %(default)s)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="key prefix (default %(default)s)")
    args = p.parse_args(argv)
    try:
        cfg = loop_config(args)
        sink = RedisLatest(connect(args.redis), args.prefix)
    except ClickvecError as e:
        print(f"clickvec serve-redis: {e}", file=sys.stderr)
        return 2
    config = {**cfg.describe(), "redis": args.redis, "prefix": args.prefix}
    try:
        stats = RedisSinkLoop(cfg, sink).run()
    except Exception as e:  # as run_command (loop.py): the cause in one line, nothing committed
        log.error("clickvec serve-redis: %s", e)
        return 1
    summary = {"config": config, "loop": asdict(stats), "redis": asdict(sink.stats)}
    write_summary(args.summary, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return 0
