"""A local Redis server for tests, benchmarks and `clickvec run`: Debian's own
`redis-server` package, fetched without root.

`apt-get download` (no root needed) puts the .deb files of redis-server, redis-tools
and the shared libraries the binary lacks on this machine into a cache dir
(~/.cache/clickvec/redis, or CLICKVEC_REDIS_CACHE), `dpkg-deb -x` unpacks them there, and
the server runs from there with LD_LIBRARY_PATH pointing at the unpacked libraries. The
libraries to fetch are found with `ldd`: only what this machine does not have.

  python -m clickvec.devtools.redis start --dir .clickvec/redis   # prints url=redis://127.0.0.1:PORT/0
  python -m clickvec.devtools.redis stop --dir .clickvec/redis
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from clickvec.devtools.proc import ChildProcess, free_port
from clickvec.errors import ClickvecError

log = logging.getLogger(__name__)

PACKAGES = ("redis-server", "redis-tools")
# Shared library (as ldd names it) -> the Debian package that ships it.
LIBRARY_PACKAGES = {
    "liblzf.so.1": "liblzf1",
    "libjemalloc.so.2": "libjemalloc2",
    "libatomic.so.1": "libatomic1",
    "libssl.so.3": "libssl3",
    "libcrypto.so.3": "libssl3",
    "libsystemd.so.0": "libsystemd0",
    "liblz4.so.1": "liblz4-1",
    "libzstd.so.1": "libzstd1",
    "liblzma.so.5": "liblzma5",
    "libgcrypt.so.20": "libgcrypt20",
    "libgpg-error.so.0": "libgpg-error0",
    "libcap.so.2": "libcap2",
}


class RedisError(ClickvecError):
    """The Redis server could not be fetched or started. Action: check that apt-get can
    reach the Debian mirror (or install redis-server), and read the log named."""


def cache_dir() -> Path:
    return Path(os.environ.get("CLICKVEC_REDIS_CACHE", Path.home() / ".cache" / "clickvec" / "redis"))


def _lib_dirs(root: Path) -> list[Path]:
    return [d for d in (root / "usr/lib/x86_64-linux-gnu", root / "lib/x86_64-linux-gnu", root / "usr/lib")
            if d.is_dir()]


def _env(root: Path) -> dict[str, str]:
    dirs = [str(d) for d in _lib_dirs(root)]
    old = os.environ.get("LD_LIBRARY_PATH")
    return {"LD_LIBRARY_PATH": ":".join(dirs + ([old] if old else []))}


def _missing_libraries(binary: Path, root: Path) -> list[str]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env={**os.environ, **_env(root)})
    return [line.split()[0] for line in out.stdout.splitlines() if "not found" in line]


def _apt_update() -> bool:
    """`apt-get update` when this is root (a fresh Debian image ships without package
    lists, and stale ones name .debs the mirror no longer has); whether it ran and worked."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    log.info("apt-get download failed: running apt-get update (root) and trying again")
    r = subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
    if r.returncode != 0:
        log.warning("apt-get update failed: %s", r.stderr.strip().splitlines()[-1:])
    return r.returncode == 0


def _fetch(packages: list[str], root: Path) -> None:
    """apt-get download the packages into `root/debs` and unpack them into `root`."""
    debs = root / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if shutil.which("apt-get") is None:
        raise RedisError("redis-server is not installed and there is no apt-get to fetch it with: "
                         "install redis-server (any Redis >= 6) and put it on PATH")
    r = subprocess.run(["apt-get", "download", *packages], cwd=debs, capture_output=True, text=True)
    if r.returncode != 0 and _apt_update():
        r = subprocess.run(["apt-get", "download", *packages], cwd=debs, capture_output=True, text=True)
    if r.returncode != 0:
        hint = " (the package lists are empty: run apt-get update as root once)" \
            if "Unable to locate package" in r.stderr else ""
        raise RedisError(f"apt-get download {' '.join(packages)} failed{hint}: "
                         f"{r.stderr.strip().splitlines()[-1:]}")
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, capture_output=True)


def redis_server_binary(root: Path | None = None) -> tuple[Path, dict[str, str]]:
    """The redis-server binary (fetched into the cache dir when missing) and the
    environment it needs. A `redis-server` on PATH is used as it is."""
    on_path = shutil.which("redis-server")
    if on_path and root is None:
        return Path(on_path), {}
    root = root or cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    binary = root / "usr" / "bin" / "redis-server"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # test sessions started at once fetch once
        if not binary.exists():
            log.info("fetching redis-server from the Debian mirror into %s", root)
            _fetch(list(PACKAGES), root)
        for _ in range(3):
            missing = _missing_libraries(binary, root)
            if not missing:
                return binary, _env(root)
            unknown = [lib for lib in missing if lib not in LIBRARY_PACKAGES]
            if unknown:
                raise RedisError(f"redis-server needs {unknown}, which this module does not know how to fetch")
            _fetch(sorted({LIBRARY_PACKAGES[lib] for lib in missing}), root)
    raise RedisError(f"redis-server still lacks {_missing_libraries(binary, root)} after fetching them")


@dataclass
class RedisServer:
    process: ChildProcess
    port: int
    data_dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.stop(20)


def _wait_ready(port: int, proc: ChildProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RedisError(f"redis-server exited with {proc.returncode}:\n{proc.log_tail(20)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    proc.stop(5)
    raise RedisError(f"redis-server did not answer on port {port} within {timeout:.0f}s:\n{proc.log_tail(20)}")


def start(data_dir: str | Path, port: int | None = None, persist: bool = False, maxmemory_mb: int = 0,
          timeout: float = 30.0, detached: bool = False) -> RedisServer:
    """A redis-server on 127.0.0.1 (a free port unless given), its files in `data_dir`.
    `persist`: an append-only file in `data_dir` (otherwise nothing is written to disk).
    Unless `detached`, the server ends when the thread that started it does."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    binary, env = redis_server_binary()
    port = port or free_port()
    args = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
            "--daemonize", "no", "--save", "", "--appendonly", "yes" if persist else "no",
            "--pidfile", str(data_dir / "redis.pid")]
    if maxmemory_mb:
        args += ["--maxmemory", f"{maxmemory_mb}mb"]
    proc = ChildProcess(args, data_dir / "redis.log", env=env, die_with_parent=not detached).start()
    _wait_ready(port, proc, timeout)
    (data_dir / "port").write_text(str(port))
    log.info("redis-server up at 127.0.0.1:%d (pid %d, dir %s)", port, proc.pid, data_dir)
    return RedisServer(proc, port, data_dir)


def stop_dir(data_dir: str | Path) -> bool:
    """Stop the server that `start` left running in `data_dir` (by its pid file)."""
    pidfile = Path(data_dir) / "redis.pid"
    if not pidfile.exists():
        return False
    try:
        os.kill(int(pidfile.read_text().strip()), 15)
    except (ProcessLookupError, ValueError):
        return False
    return True


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clickvec.devtools.redis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("start", "stop", "fetch"))
    p.add_argument("--dir", default=".clickvec/redis")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--persist", action="store_true", help="append-only file in --dir")
    args = p.parse_args(argv)
    try:
        if args.action == "fetch":
            binary, _ = redis_server_binary(cache_dir())
            print(f"redis-server={binary}")
        elif args.action == "start":
            server = start(args.dir, args.port, args.persist, detached=True)
            print(f"url={server.url}")
        else:
            print("stopped" if stop_dir(args.dir) else f"no redis-server running from {args.dir}")
    except RedisError as e:
        print(f"clickvec redis: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

