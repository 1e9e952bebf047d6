"""Baseline contenders as Faust workers, for benchmarks/pipeline.py.

  naive:     one event at a time: parse, table get, one ONNX Runtime call (B=1, T=1),
             one table write, one `topic.send` of the contract's JSON VectorMessage.
             Same RocksDB table (name, options, value format) as the clickvec worker.
  recompute: no recurrent state: keep each user's whole history in memory and re-encode
             it from the zero state on every event (one ORT call over the full history).

  python -m benchmarks.naive_agent --mode naive --model BUNDLE --brokers HOST:PORT \
      --in TOPIC --out TOPIC --group G --state-dir DIR --web-port N
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from clickvec.bundle.reader import load_bundle
from clickvec.contract.events import EventError, parse_event
from clickvec.contract.messages import VectorMessage
from clickvec.features import gap_bucket
from clickvec.logsetup import configure
from clickvec.stream.worker.state import UserState, model_id_prefix


class Recompute:
    """Per-user histories in memory; every event re-encodes the user's whole history."""

    def __init__(self, bundle: Any) -> None:
        self.bundle = bundle
        self.hist: dict[str, list[tuple[int, int, int]]] = {}
        self.last_ts: dict[str, int] = {}

    def apply(self, user_id: str, item_id: str, event_type: str, ts: int) -> tuple[int, list[float], float]:
        spec = self.bundle.spec
        h = self.hist.setdefault(user_id, [])
        h.append((spec.item_index(item_id), spec.type_index(event_type), gap_bucket(ts, self.last_ts.get(user_id))))
        self.last_ts[user_id] = ts
        seq = np.asarray(h, dtype=np.int64)  # (n, 3)
        h0, c0 = self.bundle.zero_state(1)
        _, _, _, z_last, surprise = self.bundle.step(seq[:, 0:1], seq[:, 1:2], seq[:, 2:3],
                                                     np.array([len(seq)], np.int32), h0, c0)
        return len(h), z_last[0].tolist(), float(surprise[-1, 0])


async def valid_events(stream: Any) -> AsyncIterator[tuple[Any, Any]]:
    """(message, parsed event) for each valid event of a Faust stream; bad ones are skipped."""
    async for ev in stream.events():
        try:
            yield ev.message, parse_event(ev.message.value)
        except EventError:
            continue


def build(args: argparse.Namespace) -> Any:
    import faust

    from clickvec.stream.worker.app import TABLE_NAME

    bundle = load_bundle(args.model, providers="cpu", intra_op_threads=1)
    prefix = model_id_prefix(bundle.model_id)
    L, H = bundle.layers, bundle.hidden
    app = faust.App(
        args.group, broker=f"kafka://{args.brokers}", store="rocksdb://", datadir=args.state_dir,
        topic_partitions=args.partitions, topic_replication_factor=1, consumer_auto_offset_reset="earliest",
        web_port=args.web_port, web_host="127.0.0.1", web_bind="127.0.0.1", table_standby_replicas=0,
        producer_linger_ms=2, topic_allow_declare=True,
    )
    in_topic = app.topic(args.in_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                         value_serializer="raw", partitions=args.partitions)
    out_topic = app.topic(args.out_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                          value_serializer="raw", partitions=args.partitions)

    if args.mode == "naive":
        table = app.Table(TABLE_NAME, default=None, partitions=args.partitions, key_type=bytes, value_type=bytes,
                          options={"block_cache_size": 64 << 20, "write_buffer_size": 16 << 20,
                                   "max_write_buffer_number": 2})
        ones = np.ones(1, np.int32)

        @app.agent(in_topic)
        async def naive(stream: Any) -> None:
            async for m, e in valid_events(stream):
                raw = table.get(m.key)
                st = UserState.unpack(raw, L, H) if raw is not None else UserState.fresh(prefix, L, H)
                spec = bundle.spec
                x = np.array([[spec.item_index(e.item_id)]], np.int64)
                t = np.array([[spec.type_index(e.event_type)]], np.int64)
                g = np.array([[gap_bucket(e.ts, st.last_ts if st.last_ts >= 0 else None)]], np.int64)
                h, c, _, z_last, surprise = bundle.step(x, t, g, ones, st.h[:, None], st.c[:, None])
                table[m.key] = UserState(prefix, st.seq + 1, m.partition, m.offset, e.ts,
                                         h[:, 0], c[:, 0]).pack()
                msg = VectorMessage(e.user_id, bundle.model_id, st.seq + 1, e.ts, int(time.time() * 1000),
                                    z_last[0].tolist(), float(surprise[0, 0]),
                                    f"{m.topic}[{m.partition}]@{m.offset}")
                await out_topic.send(key=m.key, value=msg.to_bytes())
    else:
        rec = Recompute(bundle)

        @app.agent(in_topic)
        async def recompute(stream: Any) -> None:
            async for m, e in valid_events(stream):
                n, z, s = rec.apply(e.user_id, e.item_id, e.event_type, e.ts)
                msg = VectorMessage(e.user_id, bundle.model_id, n, e.ts, int(time.time() * 1000), z, s,
                                    f"{m.topic}[{m.partition}]@{m.offset}")
                await out_topic.send(key=m.key, value=msg.to_bytes())

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["naive", "recompute"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--brokers", required=True)
    p.add_argument("--in", dest="in_topic", required=True)
    p.add_argument("--out", dest="out_topic", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--web-port", type=int, default=6067)
    args = p.parse_args(argv)
    configure(logging.WARNING)
    Path(args.state_dir).mkdir(parents=True, exist_ok=True)
    # The worker's logging fix, so the baselines pay no more than it does.
    import faust

    from clickvec.stream.worker.cli import worker_class

    app = build(args)
    worker_class(faust)(app, loglevel="warning", quiet=True, redirect_stdouts=False).execute_from_commandline()


if __name__ == "__main__":
    main()
