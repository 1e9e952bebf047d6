"""The lookup part of `clickvec run`: a local redis-server, `clickvec serve-redis` keeping
each user's latest vector in it, and one `RedisLookup.get(user)` per refresh of the view.

Optional: when redis-server cannot be had (no Debian mirror to fetch it from, see
clickvec/devtools/redis.py) or redis-py is missing (the `serve` extra), the run goes on
without it and says why in one line.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from clickvec.run.children import Component
from clickvec.run.view import LatencyHistogram

log = logging.getLogger(__name__)


class LiveLookup:
    """Starts redis-server under `work/redis` and the serve-redis child; `sample(user)`
    looks one user up and times it."""

    def __init__(self, work: Path, logs: Path) -> None:
        self.work = work
        self.logs = logs
        self.server: Any = None
        self.url = ""
        self.lookup: Any = None
        self.child: Component | None = None
        self.unavailable = ""  # why there is no lookup ("" while there is one)
        self.latency = LatencyHistogram()
        self.found = 0
        self.missing = 0
        self.last: tuple[str, int, str, float] | None = None  # user, seq, model id, ms

    def start(self, kafka_args: list[str], env: dict[str, str], vector_topic: str, group: str) -> Component | None:
        """The serve-redis child, or None (and the reason in `unavailable`) without Redis."""
        from clickvec.devtools import redis as redis_dev

        try:
            import redis  # noqa: F401 - the `serve` extra; checked before starting anything

            from clickvec.client import RedisLookup
        except ImportError:
            return self._without("redis-py is not installed (pip install 'clickvec[serve]')")
        rdir = self.work / "redis"
        shutil.rmtree(rdir, ignore_errors=True)  # a fresh server: this run's vectors only
        try:
            self.server = redis_dev.start(rdir)
        except redis_dev.RedisError as e:
            return self._without(str(e).splitlines()[0])
        self.url = self.server.url
        self.lookup = RedisLookup(self.url)
        self.lookup.client.ping()  # connect now: the timed lookups measure lookups, not the connect
        self.child = Component("serve-redis", [
            "serve-redis", *kafka_args, "--in", vector_topic, "--group", group, "--redis", self.server.url,
            "--summary", str(self.work / "serve-redis_summary.json")], self.logs / "serve-redis.log", env).start()
        return self.child

    def _without(self, why: str) -> None:
        self.unavailable = why
        log.warning("no lookup in this run (it goes on without Redis): %s", why)
        return None

    def sample(self, user: str | None) -> tuple[str, int, str, float] | None:
        """One timed `RedisLookup.get(user)`: (user, seq, model id, ms), or None."""
        if self.lookup is None or user is None:
            return self.last
        t0 = time.perf_counter()
        try:
            v = self.lookup.get(user)
        except Exception as e:  # noqa: BLE001 - a lookup failing must not stop the run
            log.warning("lookup of %s failed: %s", user, e)
            return self.last
        ms = (time.perf_counter() - t0) * 1000
        self.latency.add(ms)
        if v is None:
            self.missing += 1  # serve-redis has not written the user yet
            return self.last
        self.found += 1
        self.last = (user, v.seq, v.model_id, ms)
        return self.last

    def summary(self) -> dict[str, Any]:
        if self.unavailable:
            return {"available": False, "why": self.unavailable}
        lat = self.latency.summary()
        return {"available": True, "redis": self.url, "lookups": lat["n"],
                "found": self.found, "not_yet_in_redis": self.missing,
                "latency_ms": {"p50": lat["p50"], "p99": lat["p99"], "max": lat["max"]},
                "last": dict(zip(("user_id", "seq", "model_id", "ms"), self.last, strict=True)) if self.last else None}

    def stop(self) -> None:
        """After the serve-redis child stopped."""
        if self.lookup is not None:
            try:
                self.lookup.client.close()
            except Exception:  # noqa: BLE001,S110 - closing a connection to a server about to stop
                pass
        if self.server is not None:
            self.server.stop()
            self.server = None
