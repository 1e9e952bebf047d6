"""The cut-over from one model to another on the vector topic, and how a consumer follows it.

A control record marks, in every partition of the vector topic, where the new model's
vectors take over:

    key   = b"__clickvec_control__"
    value = {"type": "cutover", "model_id": NEW, "from_model_id": OLD,
             "input_topic": "clicks", "offsets": {"0": 1234, ...}, "ts": EPOCH_MS}

`offsets` are the input offsets (per input partition) from which the new model's workers
apply events; the old model's vectors of every earlier event are on the topic before the
control record (`clickvec rollout` waits for that), and right after it come one vector of
the new model per user, on the user's whole history so far. Consumers that do not know
the record skip it (it is not a vector message).

A consumer follows it with `ModelFollower`: per vector-topic partition, once a control
record has been read, only vectors of its `model_id` are taken; per user, a vector of the
same model is taken only with a higher seq than the last one taken (duplicates after a
worker restart carry the same seq). Seq counts the events applied to a user by either
model, so a user's seqs continue across the cut-over.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from clickvec.contract.messages import VectorMessage

CONTROL_KEY = b"__clickvec_control__"


@dataclass(frozen=True)
class Cutover:
    model_id: str
    from_model_id: str = ""
    input_topic: str = ""
    offsets: dict[int, int] = field(default_factory=dict)
    ts: int = 0

    def to_bytes(self) -> bytes:
        return json.dumps({"type": "cutover", "model_id": self.model_id, "from_model_id": self.from_model_id,
                           "input_topic": self.input_topic,
                           "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
                           "ts": self.ts or int(time.time() * 1000)}, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Cutover:
        d = json.loads(data)
        if d.get("type") != "cutover" or not d.get("model_id"):
            raise ValueError(f"not a cut-over control record: {data[:200]!r}")
        return cls(d["model_id"], d.get("from_model_id", ""), d.get("input_topic", ""),
                   {int(p): int(o) for p, o in d.get("offsets", {}).items()}, int(d.get("ts", 0)))


def is_control(key: bytes | None) -> bool:
    return key == CONTROL_KEY


def publish_cutover(producer: Any, topic: str, partitions: int, cut: Cutover) -> None:
    """The control record into every partition of the vector topic (the caller flushes)."""
    value = cut.to_bytes()
    for p in range(partitions):
        producer.send(topic, CONTROL_KEY, value, partition=p)


class ModelFollower:
    """Which vectors a consumer takes (module docstring). `active` holds, per vector-topic
    partition, the model named by the last control record read there."""

    def __init__(self, active: dict[int, str] | None = None) -> None:
        self.active: dict[int, str] = dict(active or {})
        self.last: dict[str, tuple[str, int]] = {}  # user -> (model id, seq) last taken

    def control(self, partition: int, cut: Cutover) -> None:
        self.active[partition] = cut.model_id

    def takes_model(self, partition: int, model_id: str) -> bool:
        """Whether a vector of `model_id` on `partition` is of the active model (any model
        before the partition's first control record)."""
        want = self.active.get(partition)
        return want is None or model_id == want

    def accept(self, partition: int, msg: VectorMessage) -> bool:
        if not self.takes_model(partition, msg.model_id):
            return False
        last = self.last.get(msg.user_id)
        if last is not None and last[0] == msg.model_id and msg.seq <= last[1]:
            return False
        self.last[msg.user_id] = (msg.model_id, msg.seq)
        return True
