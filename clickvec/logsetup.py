"""Logging set-up, one way for the CLI, the stream worker, `clickvec run`, the tests and
the benchmarks: plain text lines, or one JSON object per line for log shippers
(`clickvec stream --log-format json`)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        d = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `configure` adds (so a second call adds none)."""


def formatter(json_lines: bool = False) -> logging.Formatter:
    return JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT)


def configure(level: int | str = logging.INFO, json: bool = False, file: Path | None = None) -> None:
    """Root logger to stderr at `level` (text or JSON lines), once: a second call only
    changes the level. `file` adds a text log file next to it."""
    root = logging.getLogger()
    level = level.upper() if isinstance(level, str) else level
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        h = _StderrHandler(sys.stderr)
        h.setFormatter(formatter(json))
        root.addHandler(h)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(file)
        fh.setFormatter(formatter(False))
        root.addHandler(fh)
    root.setLevel(level)


def dict_config(level: str, json: bool = True) -> dict[str, Any]:
    """The same set-up as a `logging.config.dictConfig` dict (Faust takes one)."""
    fmt: dict[str, Any] = {"()": JsonFormatter} if json else {"format": TEXT_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": fmt},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "main", "stream": "ext://sys.stderr"}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
    }


def logging_config(level: str) -> dict[str, Any]:
    """JSON lines for the stream worker (its `--log-format json`)."""
    return dict_config(level, json=True)
