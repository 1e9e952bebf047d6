"""The `clickvec` command. Each subcommand lives in its own module and exposes
`main(argv: list[str]) -> int`; modules are imported lazily so `clickvec stream`
never imports torch."""

from __future__ import annotations

import importlib
import logging
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "broker": ("clickvec.devtools.broker", "start/stop a local Apache Kafka broker (fetched with Maven)"),
    "synth": ("clickvec.devtools.synth", "generate synthetic click streams with planted structure"),
    "produce": ("clickvec.devtools.produce", "send events (synthetic or from a file) to a Kafka topic"),
    "train": ("clickvec.training.cli", "train the LSTM encoder offline (needs the [train] extra)"),
    "export": ("clickvec.export.cli", "export a trained run to a verified ONNX model bundle"),
    "stream": ("clickvec.stream.worker.cli", "run the Faust stream worker"),
    "alerts": ("clickvec.stream.consumers.alerts", "fraud-alerting consumer of the vector topic"),
    "recommend": ("clickvec.stream.consumers.recommend", "live recommendation consumer of the vector topic"),
    "forget": ("clickvec.forget", "erase users: tombstones to the stream's input topic"),
    "run": ("clickvec.run.cli", "the whole pipeline in one command"),
    "rollout": ("clickvec.lifecycle.rollout", "put a new model in service beside the old one, cut over without a gap"),
    "serve-redis": ("clickvec.lifecycle.redis_sink", "keep every user's latest vector in Redis"),
    "backfill": ("clickvec.lifecycle.backfill", "rebuild every user's state offline and hand it to the worker group"),
    "compare": ("clickvec.lifecycle.compare", "two model bundles' next-item HR@10/NDCG@10 on the same evaluation data"),
}


def _usage() -> str:
    lines = ["usage: clickvec <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {doc}" for name, (_, doc) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "--version":
        from clickvec import __version__

        print(__version__)
        return 0
    if cmd not in SUBCOMMANDS:
        print(f"clickvec: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from clickvec.logsetup import configure

    configure(logging.INFO)
    module = importlib.import_module(SUBCOMMANDS[cmd][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
