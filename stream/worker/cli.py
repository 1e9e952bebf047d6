"""`clickvec stream`: run the Faust worker.

  clickvec stream --model models/NAME --brokers HOST:PORT --in clicks --out user-vectors

Settings also come from CLICKVEC_* environment variables and a JSON --config file; the
resolved configuration is logged at start-up. SIGTERM / Ctrl-C stop it cleanly.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from clickvec.errors import ClickvecError
from clickvec.preflight import held_logs
from clickvec.stream.worker import config as config_mod

log = logging.getLogger(__name__)


def worker_class(faust: Any) -> Any:
    class Worker(faust.Worker):  # type: ignore[misc, name-defined]
        """Faust's worker with the root logger at the requested level. Faust (mode) leaves
        the root logger at DEBUG and filters in the handler, so every debug call of
        aiokafka and Faust would build a log record only to drop it."""

        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            super().on_setup_root_logger(logger, level)
            if level:
                logger.setLevel(level)

    return Worker


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clickvec stream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    config_mod.add_arguments(p)
    p.add_argument("--loglevel", default="info")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="json: one JSON object per line (structured logs)")
    p.add_argument("--debug", action="store_true",
                   help="librdkafka's own log during the start-up connection check")
    args = p.parse_args(argv)
    try:
        with held_logs(not args.debug):
            cfg, bundle, partitions, brokers = _prepare(args)
    except (ClickvecError, ValueError, OSError) as e:
        # A user's mistake (model path, brokers, credentials, CA file, topic): one line.
        print(f"clickvec stream: {e}", file=sys.stderr)
        return 2

    import faust

    from clickvec.stream.worker.app import build_app

    app = build_app(cfg, bundle, partitions, brokers)
    extra = {}
    if args.log_format == "json":
        from clickvec.logsetup import logging_config

        extra["logging_config"] = logging_config(args.loglevel)
    worker = worker_class(faust)(app, loglevel=args.loglevel, quiet=True, redirect_stdouts=False, **extra)
    worker.execute_from_commandline()
    return 0


def _prepare(args: argparse.Namespace) -> tuple[config_mod.StreamConfig, Any, int, int]:
    """What the worker checks before any Faust client connects, in this order: the
    settings, the model bundle (no connection is made for a bad path), the brokers
    (reachable, credentials, TLS), the Schema Registry if one is used, the input topic.
    Returns the resolved settings, the bundle, and the input topic's partition and the
    cluster's broker counts."""
    from clickvec.bundle.reader import load_bundle
    from clickvec.contract.registry import check_registry
    from clickvec.stream.worker.app import ensure_topics
    from clickvec.stream.worker.probe import cluster_metadata

    cfg = config_mod.resolve(args)
    bundle = load_bundle(cfg.model, providers=cfg.providers, intra_op_threads=cfg.intra_op_threads,
                         trust=cfg.trust or None)
    md = cluster_metadata(cfg, debug=args.debug)
    check_registry(cfg.wire())  # --registry, when a wire format uses one
    partitions = ensure_topics(cfg, md)
    Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
    return cfg, bundle, partitions, len(md.brokers)
