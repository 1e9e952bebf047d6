"""Helpers for end-to-end stream tests: run the real worker as a process, read what it
published, and check the design's correctness property against the offline encoder."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from confluent_kafka import Consumer, KafkaException

from clickvec.contract.events import ClickEvent
from clickvec.contract.messages import DeadLetter, VectorMessage
from clickvec.devtools.proc import ChildProcess, clickvec_command, free_port
from clickvec.kafka import PARTITION_EOF

REPO = Path(__file__).resolve().parents[1]


class WorkerProcess(ChildProcess):
    """`clickvec stream` in a child process, with its log in a file."""

    def __init__(self, bootstrap: str, model: Path, in_topic: str, out_topic: str, dlq_topic: str,
                 group: str, state_dir: Path, log_path: Path, *extra: str) -> None:
        super().__init__(clickvec_command(
            "stream", "--model", str(model), "--brokers", bootstrap,
            "--in", in_topic, "--out", out_topic, "--dlq", dlq_topic,
            "--group", group, "--state-dir", str(state_dir),
            "--web-port", str(free_port()), "--max-batch", "512", "--max-wait", "0.02",
            *extra,
        ), log_path, cwd=REPO)

    def start(self) -> WorkerProcess:
        super().start()
        return self

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM and wait: the worker's clean shutdown."""
        return super().stop(timeout)

    def log_tail(self, n: int = 60) -> str:
        return super().log_tail(n)


class TopicReader:
    """Reads a topic from the beginning, incrementally, with its own consumer."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.c = Consumer({
            "bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest", "enable.auto.commit": False,
        })
        self.c.subscribe([topic])
        self.topic = topic
        self.messages: list[tuple[bytes | None, bytes]] = []
        self.next: dict[int, int] = {}  # partition -> the offset after the last read

    def poll(self, seconds: float = 0.5) -> int:
        n = 0
        for m in self.c.consume(num_messages=10_000, timeout=seconds):
            err = m.error()
            if err is not None:
                if err.code() == PARTITION_EOF:
                    continue
                raise KafkaException(err)
            self.messages.append((m.key(), m.value()))
            self.next[m.partition()] = m.offset() + 1
            n += 1
        return n

    def read_to_end(self, timeout: float = 60) -> None:
        """Poll until every partition is read up to its end offset as of now (a stopped
        worker's last repeats included)."""
        from confluent_kafka import TopicPartition

        parts = self.c.list_topics(self.topic, timeout=10).topics[self.topic].partitions
        ends = {p: self.c.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)[1] for p in parts}
        deadline = time.monotonic() + timeout
        while any(self.next.get(p, 0) < end for p, end in ends.items()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.topic}: not read to its end offsets {ends} within {timeout}s")
            self.poll(0.5)

    def close(self) -> None:
        self.c.close()


@dataclass
class VectorLog:
    """Vectors published per user and seq (duplicates kept, to compare)."""

    by_user: dict[str, dict[int, list[VectorMessage]]]
    total: int

    @classmethod
    def of(cls, messages: Sequence[tuple[bytes | None, bytes]]) -> VectorLog:
        by_user: dict[str, dict[int, list[VectorMessage]]] = defaultdict(lambda: defaultdict(list))
        for _, v in messages:
            m = VectorMessage.from_bytes(v)
            by_user[m.user_id][m.seq].append(m)
        return cls(by_user, len(messages))

    def distinct(self) -> int:
        return sum(len(s) for s in self.by_user.values())


def wait_for(reader: TopicReader, done, timeout: float, workers: Sequence[WorkerProcess] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reader.poll(0.5)
        if done(reader.messages):
            return
        for w in workers:
            if w.proc is not None and not w.alive():
                raise AssertionError(f"worker exited with {w.proc.returncode}:\n{w.log_tail()}")
    tails = "\n---\n".join(w.log_tail() for w in workers)
    raise AssertionError(f"timed out after {timeout}s with {len(reader.messages)} messages\n{tails}")


def user_sequences(events: Sequence[ClickEvent]) -> dict[str, list[ClickEvent]]:
    out: dict[str, list[ClickEvent]] = defaultdict(list)
    for e in events:
        out[e.user_id].append(e)
    return out


def check_vectors(bundle, events: Sequence[ClickEvent], log: VectorLog, tol: float = 1e-5) -> dict[str, float]:
    """The design's property: the vector after a user's n-th event equals the offline
    encoder on the user's first n events. Every seq 1..n must be present (nothing
    lost); a seq beyond n, or a vector that differs, means an event was applied twice."""
    spec = bundle.spec
    max_diff = 0.0
    lost: list[tuple[str, int]] = []
    extra: list[tuple[str, int]] = []
    wrong: list[tuple[str, int, float]] = []
    seqs = user_sequences(events)
    for uid, evs in seqs.items():
        enc = spec.encode_sequence([e.item_id for e in evs], [e.event_type for e in evs], [e.ts for e in evs])
        z = bundle.encode_offline(enc)  # (n, D)
        got = log.by_user.get(uid, {})
        for n in range(1, len(evs) + 1):
            msgs = got.get(n)
            if not msgs:
                lost.append((uid, n))
                continue
            for m in msgs:
                d = float(np.max(np.abs(np.asarray(m.vector, dtype=np.float32) - z[n - 1])))
                max_diff = max(max_diff, d)
                if d > tol:
                    wrong.append((uid, n, d))
        extra += [(uid, s) for s in got if s > len(evs)]
    extra += [(uid, 0) for uid in log.by_user if uid not in seqs]
    assert not lost, f"{len(lost)} vectors lost, e.g. {lost[:5]}"
    assert not extra, f"{len(extra)} vectors beyond the events sent (applied twice?), e.g. {extra[:5]}"
    assert not wrong, f"{len(wrong)} vectors differ from the offline encoder, e.g. {wrong[:5]}"
    return {"max_abs_diff": max_diff, "users": len(seqs), "vectors": log.total, "distinct": log.distinct()}


def read_dead_letters(messages: Sequence[tuple[bytes | None, bytes]]) -> list[DeadLetter]:
    return [DeadLetter.from_bytes(v) for _, v in messages]
