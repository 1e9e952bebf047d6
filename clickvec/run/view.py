"""The terminal view of `clickvec run`: plain ANSI text, redrawn about once a second.

Rendering only: `render_screen(snap)` and `render_line(snap)` turn a `Snapshot` (what
`clickvec.run.job` measured) into text. No curses, no extra dependency; a terminal that
understands "clear screen, cursor home" is all it needs.
"""

from __future__ import annotations

import math
import shutil
import sys
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

_BARS = "▁▂▃▄▅▆▇█"
CLEAR = "\x1b[H\x1b[2J"
BOLD, DIM, RED, GREEN, YELLOW, RESET = "\x1b[1m", "\x1b[2m", "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[0m"


class LatencyHistogram:
    """Fixed log-spaced buckets (about 2 % wide, 0.1 ms .. 10 min): constant memory
    however long the run, percentiles within a bucket's width."""

    def __init__(self, lo_ms: float = 0.1, hi_ms: float = 600_000.0, per_decade: int = 120) -> None:
        n = int(math.ceil(math.log10(hi_ms / lo_ms) * per_decade))
        self.edges = [lo_ms * 10 ** (i / per_decade) for i in range(n + 1)]
        self.counts = [0] * (n + 2)
        self.n = 0
        self.max = 0.0

    def add(self, ms: float) -> None:
        self.counts[bisect_left(self.edges, ms)] += 1
        self.n += 1
        self.max = max(self.max, ms)

    def percentile(self, q: float) -> float | None:
        if self.n == 0:
            return None
        want = q / 100.0 * self.n
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= want and c:
                return min(self.edges[min(i, len(self.edges) - 1)], self.max)
        return self.max

    def summary(self) -> dict[str, float | int | None]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 2)

        return {"n": self.n, "p50": r(self.percentile(50)), "p95": r(self.percentile(95)),
                "p99": r(self.percentile(99)), "max": r(self.max) if self.n else None}


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> list[float | None]:
    """Nearest-rank percentiles of a small window of values."""
    if not values:
        return [None] * len(qs)
    s = sorted(values)
    return [s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))] for q in qs]


def sparkline(values: Sequence[float]) -> str:
    """Symmetric around zero: the lowest bar is -max|v|, the highest +max|v|."""
    if not values:
        return ""
    m = max(abs(v) for v in values) or 1.0
    return "".join(_BARS[min(7, int((v / m + 1) / 2 * 8))] for v in values)


@dataclass
class Snapshot:
    """Everything one frame shows; built by the main job once per refresh."""

    elapsed_s: float = 0.0
    duration_s: float | None = None
    phase: str = "streaming"
    brokers: str = ""
    model_id: str = ""
    produced: int = 0
    malformed: int = 0
    in_rate: float = 0.0  # events/s produced, last window
    worker_in_rate: float | None = None  # events/s the worker consumed (its /metrics)
    out_rate: float = 0.0  # vectors/s read back from the vector topic
    vectors: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)
    waiting: int | None = None  # events produced whose vector has not been read back yet
    latency_now: list[float | None] = field(default_factory=lambda: [None, None, None])
    latency_all: dict[str, Any] = field(default_factory=dict)
    top_surprise: list[tuple[str, float, int, str]] = field(default_factory=list)  # user, surprise, seq, tag
    watched: list[tuple[str, int, list[float], float]] = field(default_factory=list)  # user, seq, z, surprise
    alerts: int = 0
    latest_alerts: list[str] = field(default_factory=list)
    recommendations: int = 0
    latest_recommendation: str = ""
    components: dict[str, str] = field(default_factory=dict)
    workdir: str = ""
    warnings: list[str] = field(default_factory=list)  # about the model, shown in plain words
    lookup: tuple[str, int, str, float] | None = None  # RedisLookup.get: user, seq, model id, ms
    lookup_off: str = ""  # why the run has no lookup


def _ms(v: float | None) -> str:
    if v is None:
        return "     - "
    return f"{v:6.1f}ms" if v < 1000 else f"{v / 1000:6.2f}s"


def _clip(s: str, width: int) -> str:
    return s if len(s) <= width else s[: max(0, width - 1)] + "…"


def render_screen(s: Snapshot, width: int | None = None, color: bool = True) -> str:
    """One full frame (no clear-screen prefix)."""
    width = width or shutil.get_terminal_size((100, 40)).columns
    b, d, red, grn, yel, rst = (BOLD, DIM, RED, GREEN, YELLOW, RESET) if color else ("",) * 6
    left = _time_left(s)
    dead = sum(s.dead_letters.values())
    lines = [
        f"{b}clickvec run{rst}  {s.phase}  {s.elapsed_s:6.0f} s{left}   brokers {s.brokers}   model {s.model_id[:12]}",
        "",
        f"{b}throughput{rst}  in {s.in_rate:7.0f} ev/s"
        + (f" (worker {s.worker_in_rate:7.0f})" if s.worker_in_rate is not None else "")
        + f"   out {s.out_rate:7.0f} vec/s   waiting for vectors {_count(s.waiting)}",
        f"{b}totals{rst}      produced {s.produced:,} (+{s.malformed} malformed)   vectors {s.vectors:,}   "
        f"dead letters {red if dead else ''}{dead}{rst if dead else ''}"
        + (f" {d}{dict(sorted(s.dead_letters.items()))}{rst}" if dead else ""),
        f"{b}latency{rst}     produce→vector received, last 10 s  p50 {_ms(s.latency_now[0])}  "
        f"p95 {_ms(s.latency_now[1])}  p99 {_ms(s.latency_now[2])}",
        f"            whole run{' ' * 24}p50 {_ms(s.latency_all.get('p50'))}  "
        f"p95 {_ms(s.latency_all.get('p95'))}  p99 {_ms(s.latency_all.get('p99'))}",
        *(f"{yel}warning: {w}{rst}" for w in s.warnings),
        "",
        f"{b}most surprising users now{rst} {d}(mean surprise of their last 3 events){rst}",
    ]
    if not s.top_surprise:
        lines.append(f"  {d}(waiting for vectors){rst}")
    for user, surprise, seq, tag in s.top_surprise:
        t = f"  {red}{tag}{rst}" if tag else ""
        lines.append(f"  {user:<16} surprise {surprise:7.2f}   events {seq:4d}{t}")
    lines += ["", f"{b}vectors changing{rst} {d}(first dims as bars, then z[0:6]){rst}"]
    if not s.watched:
        lines.append(f"  {d}(waiting for vectors){rst}")
    for user, seq, z, surprise in s.watched:
        nums = " ".join(f"{v:+.2f}" for v in z[:6])
        lines.append(f"  {user:<16} #{seq:<4d} {grn}{sparkline(z[:24])}{rst}  {nums}  s={surprise:.2f}")
    lines += ["", f"{b}alerts{rst} {s.alerts:,}   {b}recommendations{rst} {s.recommendations:,}"]
    for a in s.latest_alerts:
        lines.append(f"  {yel}!{rst} {a}")
    if s.latest_recommendation:
        lines.append(f"  {d}latest rec:{rst} {s.latest_recommendation}")
    lines += ["", _lookup_line(s, b, d, rst)]
    comp = "   ".join(f"{k} {v}" for k, v in s.components.items())
    lines += ["", f"{d}{comp}{rst}", f"{d}workdir {s.workdir} (logs, run_summary.json){rst}"]
    return "\n".join(_clip(line, width + (len(line) - len(_strip(line)))) for line in lines)


def _lookup_line(s: Snapshot, b: str = "", d: str = "", rst: str = "") -> str:
    if s.lookup_off:
        return f"{b}lookup{rst} {d}off: {s.lookup_off}{rst}"
    if s.lookup is None:
        return f"{b}lookup{rst} {d}(waiting for a user in Redis){rst}"
    user, seq, model_id, ms = s.lookup
    return (f"{b}lookup{rst} RedisLookup.get({user!r}) → seq {seq}  model {model_id[:12]}  "
            f"{ms:.2f} ms {d}(serve-redis keeps each user's latest vector){rst}")


def _time_left(s: Snapshot) -> str:
    if s.phase.startswith("draining"):
        return "  (producer stopped, the pipeline catches up)"
    if s.duration_s:
        return f"  {max(0.0, s.duration_s - s.elapsed_s):5.0f} s left"
    return "  Ctrl-C to stop"


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _strip(s: str) -> str:
    for code in (BOLD, DIM, RED, GREEN, YELLOW, RESET):
        s = s.replace(code, "")
    return s


def render_line(s: Snapshot) -> str:
    """The --no-dashboard view: one line every few seconds."""
    p50, p95, p99 = s.latency_now
    top = s.top_surprise[0] if s.top_surprise else None
    phase = "" if s.phase == "streaming" else f"{s.phase}: "
    return (
        f"[{s.elapsed_s:5.0f}s] {phase}produced {s.produced} ({s.in_rate:.0f}/s) vectors {s.vectors} "
        f"({s.out_rate:.0f}/s) dlq {sum(s.dead_letters.values())} alerts {s.alerts} recs {s.recommendations} "
        f"waiting {_count(s.waiting)} latency (last 10 s) p50 {_ms(p50).strip()} p95 {_ms(p95).strip()} "
        f"p99 {_ms(p99).strip()}"
        + (f" top {top[0]}={top[1]:.2f}" if top else "")
        + (f" lookup {s.lookup[0]}#{s.lookup[1]} {s.lookup[3]:.2f}ms" if s.lookup else "")
    )


class Screen:
    """Redraws a frame in place on a TTY; prints a status line every `every` s otherwise."""

    def __init__(self, live: bool, out: TextIO | None = None, every: float = 5.0) -> None:
        self.out = out or sys.stdout
        self.live = live
        self.every = every
        self._last_line = -1e9

    def show(self, snap: Snapshot) -> None:
        if self.live:
            self.out.write(CLEAR + render_screen(snap) + "\n")
            self.out.flush()
        elif snap.elapsed_s - self._last_line >= self.every:
            self._last_line = snap.elapsed_s
            print(render_line(snap), file=self.out, flush=True)
