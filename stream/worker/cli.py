"""`clickvec stream`: run the Faust worker.

  clickvec stream --model models/NAME --brokers HOST:PORT --in clicks --out user-vectors

Settings also come from CLICKVEC_* environment variables and a JSON --config file; the
resolved configuration is logged at start-up. SIGTERM / Ctrl-C stop it cleanly.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

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
    args = p.parse_args(argv)
    cfg = config_mod.resolve(args)
    Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)

    import faust
    from clickvec.stream.worker.app import build_app

    app = build_app(cfg)
    extra = {}
    if args.log_format == "json":
        from clickvec.logsetup import logging_config

        extra["logging_config"] = logging_config(args.loglevel)
    worker = worker_class(faust)(app, loglevel=args.loglevel, quiet=True, redirect_stdouts=False, **extra)
    worker.execute_from_commandline()
    return 0
