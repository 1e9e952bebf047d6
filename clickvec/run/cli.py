"""`clickvec run` (see clickvec/run/config.py for what it does): the start-up checks,
logging, the job, the exit code."""

from __future__ import annotations

import sys
from pathlib import Path

from clickvec.errors import ClickvecError
from clickvec.logsetup import configure
from clickvec.run.config import RunConfig, parse_args


def preflight(cfg: RunConfig) -> None:
    """What can be checked in seconds, before the workdir is touched and before minutes of
    building: the events file, and with --brokers the brokers (reachable, credentials,
    TLS). A mistake here would otherwise surface only after the build, or as a failed run."""
    if cfg.data is not None and not Path(cfg.data).is_file():
        raise ClickvecError(f"the events file {cfg.data!r} (--data) does not exist")
    if cfg.brokers is not None:
        from clickvec.preflight import cluster_metadata

        cluster_metadata(cfg.connection)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        preflight(cfg)
    except ClickvecError as e:
        print(f"clickvec run: {e}", file=sys.stderr)
        return 2
    from clickvec.run.job import Job
    from clickvec.run.summary import summary_markdown

    configure("INFO", file=Path(cfg.workdir) / "logs" / "run.log")
    job = Job(cfg)
    try:
        s = job.run()
    except (ClickvecError, OSError) as e:
        print(f"clickvec run: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("clickvec run: interrupted", file=sys.stderr)
        return 130
    print(summary_markdown(s))
    failed = [n for n, st in s.get("components", {}).items() if st.startswith(("exited", "stopped (exit"))]
    return 1 if "stream" in failed else 0


if __name__ == "__main__":
    sys.exit(main())
