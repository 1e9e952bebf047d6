"""The pipeline ceiling, for benchmarks/pipeline.py: a confluent-kafka loop that consumes
the input topic in batches and produces one small message per event (its key and its
source "topic[partition]@offset"). No model, no state, no JSON parsing of the event.

  python -m benchmarks.ceiling --brokers HOST:PORT --in TOPIC --out TOPIC --group G
"""

from __future__ import annotations

import argparse
import signal

from confluent_kafka import Consumer, Producer

from clickvec.kafka import produce_waiting


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--brokers", required=True)
    p.add_argument("--in", dest="in_topic", required=True)
    p.add_argument("--out", dest="out_topic", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--max-wait", type=float, default=0.02)
    # The broker answers a fetch as soon as any record is there (fetch.min.bytes 1), so a
    # longer wait costs no latency; with 5 ms an idle consumer sent 200 fetches a second.
    p.add_argument("--fetch-wait-ms", type=int, default=100)
    a = p.parse_args(argv)
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    c = Consumer({"bootstrap.servers": a.brokers, "group.id": a.group, "auto.offset.reset": "earliest",
                  "enable.auto.commit": True, "fetch.wait.max.ms": a.fetch_wait_ms})
    # Same delivery settings as the clickvec worker's sink.
    out = Producer({"bootstrap.servers": a.brokers, "linger.ms": 2, "enable.idempotence": True, "acks": "all",
                    "compression.type": "lz4", "batch.num.messages": 10000,
                    "queue.buffering.max.messages": 1_000_000, "partitioner": "murmur2_random"})
    c.subscribe([a.in_topic])
    while running:
        msgs = c.consume(num_messages=a.max_batch, timeout=a.max_wait)
        for m in msgs:
            if m.error() is not None:
                continue
            key = m.key()
            value = b'{"user_id":"%s","source":"%s[%d]@%d"}' % (key, m.topic().encode(), m.partition(), m.offset())
            produce_waiting(out, a.out_topic, key, value, wait=0.01)
        out.poll(0)
    out.flush(10)
    c.close()


if __name__ == "__main__":
    main()
