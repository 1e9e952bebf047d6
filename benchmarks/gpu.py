"""The GPU path: the step graph on ONNX Runtime's CUDA execution provider, CPU-vs-GPU
parity, and the `clickvec stream` worker from a backlog with `--providers cuda`.

Run through `benchmarks/gpu.sh` (which installs onnxruntime-gpu when the CUDA provider is
missing). Parts, each recorded in one JSON (default `benchmarks/results/gpu.json`):

* **step**: a default-size bundle (random weights, 2,002 items; weights do not change the
  cost), T = 1, B = 1 .. 8,192, through `clickvec.bundle.load_bundle(providers="cuda")`,
  i.e. the worker's own path: inputs bound from host memory, outputs copied back
  (`io_binding`). Beside it the same graph with h, c and the event ids already resident on
  the device (`OrtValue`s bound once), the upper bound of a worker that kept states on
  the GPU.
* **parity**: the same inputs through the CPU and CUDA providers, at B = 1, 1,024 and
  8,192 with T = 1 and at B = 256 with T = 32; the largest absolute difference of every
  output, against a bound of 1e-4.
* **worker**: `benchmarks.pipeline.backlog_run` with `--providers cuda` and with
  `--providers cpu` on the same load (a broker started here unless `--bootstrap`).

    python -m benchmarks.gpu [--quick] [--no-worker] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks import common
from clickvec.bundle.format import BundleError
from clickvec.bundle.reader import load_bundle
from clickvec.logsetup import configure

log = logging.getLogger("gpu")
RESULTS = common.RESULTS / "gpu.json"
BATCHES = [2**k for k in range(14)]  # 1 .. 8,192
PARITY_BOUND = 1e-4
GOAL_STEPS_PER_S = 5_000_000  # at B = 8,192 on a data-centre GPU (issue target)


def _inputs(bundle, T: int, B: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    n_items, n_types = bundle.spec.n_items, bundle.spec.n_event_types
    items = rng.integers(2, n_items, (T, B)).astype(np.int64)
    types = rng.integers(2, n_types, (T, B)).astype(np.int64)
    gaps = rng.integers(1, 24, (T, B)).astype(np.int64)
    lengths = rng.integers(1, T + 1, B).astype(np.int32) if T > 1 else np.ones(B, np.int32)
    h = (rng.standard_normal((bundle.layers, B, bundle.hidden)) * 0.3).astype(np.float32)
    c = (rng.standard_normal((bundle.layers, B, bundle.hidden)) * 0.3).astype(np.float32)
    return items, types, gaps, lengths, h, c


def _time(fn, min_seconds: float, min_calls: int = 5) -> dict[str, float]:
    fn()  # first call at this shape (allocations, cuDNN plans)
    lat = []
    start = time.perf_counter()
    while len(lat) < min_calls or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    a = np.array(lat)
    return {"calls": len(lat), "p50_ms": float(np.median(a)) * 1e3, "p99_ms": float(np.quantile(a, 0.99)) * 1e3}


def _resident_runner(bundle, feeds: tuple[np.ndarray, ...], device: str):
    """Inputs bound once as device OrtValues, outputs left on the device: the graph's own cost."""
    from clickvec.bundle.format import STEP_INPUTS, STEP_OUTPUTS

    sess = bundle.session.session
    binding = sess.io_binding()
    for name, value in zip(STEP_INPUTS, feeds, strict=True):
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), device, 0))
    for name in STEP_OUTPUTS:
        binding.bind_output(name, device)

    def run() -> None:
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run


def step_sweep(path: Path, batches: list[int], seconds: float, device: str) -> list[dict[str, Any]]:
    bundle = load_bundle(path, providers=device, io_binding=True)
    rng = np.random.default_rng(0)
    rows = []
    for B in batches:
        feeds = _inputs(bundle, 1, B, rng)
        host = _time(lambda f=feeds: bundle.step(*f), seconds)
        dev = _time(_resident_runner(bundle, feeds, device), seconds)
        row = {"batch": B, "host_io": host, "device_resident": dev,
               "user_steps_per_s": B / (host["p50_ms"] / 1e3),
               "user_steps_per_s_device_resident": B / (dev["p50_ms"] / 1e3)}
        log.info("B=%5d  worker path %8.3f ms p50 %11.0f steps/s | resident %8.3f ms %11.0f steps/s", B,
                 host["p50_ms"], row["user_steps_per_s"], dev["p50_ms"], row["user_steps_per_s_device_resident"])
        rows.append(row)
    return rows


def parity(path: Path, device: str) -> dict[str, Any]:
    cpu = load_bundle(path, providers="cpu")
    gpu = load_bundle(path, providers=device, io_binding=True)
    rng = np.random.default_rng(1)
    names = ("h", "c", "z_seq", "z_last", "surprise")
    cases = []
    for T, B in ((1, 1), (1, 1024), (1, 8192), (32, 256)):
        feeds = _inputs(cpu, T, B, rng)
        a, b = cpu.step(*feeds), gpu.step(*feeds)
        lengths = feeds[3]
        diffs = {}
        for name, x, y in zip(names, a, b, strict=True):
            if name in ("z_seq", "surprise"):  # rows past a user's length are undefined
                valid = np.arange(T)[:, None] < lengths[None, :]
                x, y = x[valid], y[valid]
            diffs[name] = float(np.max(np.abs(x - y)))
        cases.append({"T": T, "B": B, "max_abs_diff": diffs})
        log.info("parity T=%d B=%d %s", T, B, diffs)
    worst = max(max(c["max_abs_diff"].values()) for c in cases)
    return {"bound": PARITY_BOUND, "max_abs_diff": worst, "ok": worst <= PARITY_BOUND, "cases": cases,
            "gpu_providers": gpu.providers}


def worker_runs(path: Path, quick: bool, bootstrap: str | None, work: Path, device: str) -> dict[str, Any]:
    from benchmarks.pipeline import backlog_run
    n, users = (30_000, 1_000) if quick else (200_000, 4_000)
    events = common.make_events(n, users)
    out = {"events": n, "users": users}
    with common.kafka(work, bootstrap) as bootstrap:
        ctx = {"bootstrap": bootstrap, "work": work, "partitions": 4, "bundle": path}
        for prov in dict.fromkeys((device, "cpu")):
            out[prov] = backlog_run("clickvec", events, ctx, cap_s=60, max_batch=8192 if prov == "cuda" else 1024,
                                    extra=["--providers", prov])
    return out


def _gpu_name() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shorter timings and a 30k-event worker run")
    p.add_argument("--no-worker", action="store_true", help="step graph and parity only (no broker)")
    p.add_argument("--bootstrap", default=None, help="use this broker for the worker runs")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu runs the same script on the CPU provider (a check of the script itself)")
    a = p.parse_args(argv)
    configure(logging.INFO)
    if a.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit(f"error: this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider; "
                         "run benchmarks/gpu.sh, which installs onnxruntime-gpu")
    load = os.getloadavg()
    result: dict[str, Any] = {
        "benchmark": "gpu", "device": a.device, "gpu": _gpu_name(), "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(), "cpu_count": os.cpu_count(),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "goal_user_steps_per_s_at_8192": GOAL_STEPS_PER_S,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = common.make_bundle(Path(tmp))
        result["model"] = json.loads((Path(tmp) / "model.json").read_text())
        try:
            result["parity"] = parity(path, a.device)
        except BundleError as e:
            raise SystemExit(f"error: {e}") from None
        result["step"] = step_sweep(path, BATCHES, 0.3 if a.quick else 1.0, a.device)
        best = max(result["step"], key=lambda r: r["user_steps_per_s"])
        at_8192 = next(r for r in result["step"] if r["batch"] == 8192)
        result["summary"] = {
            "user_steps_per_s_at_8192": at_8192["user_steps_per_s"],
            "user_steps_per_s_at_8192_device_resident": at_8192["user_steps_per_s_device_resident"],
            "best_batch": best["batch"], "best_user_steps_per_s": best["user_steps_per_s"],
            "goal_reached": at_8192["user_steps_per_s"] >= GOAL_STEPS_PER_S,
            "parity_ok": result["parity"]["ok"],
        }
        if not a.no_worker:
            result["worker"] = worker_runs(path, a.quick, a.bootstrap, Path(tmp), a.device)
    result["load_average_1m_before_after"] = [load[0], os.getloadavg()[0]]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
