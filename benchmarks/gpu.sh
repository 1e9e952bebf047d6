#!/usr/bin/env bash
# The GPU path in one script (under 5 minutes): installs what it needs, then runs
# benchmarks/gpu.py (step graph on the CUDA execution provider with I/O binding at
# B = 1..8,192, CPU-vs-GPU parity, and the worker from a backlog with --providers cuda).
#
#   bash benchmarks/gpu.sh [--quick] [--no-worker]        # results: benchmarks/results/gpu.json
#
# Environment:
#   PYTHON      the interpreter to build the venv from (default python3)
#   WHEELHOUSE  a folder of wheels to install from instead of PyPI (machines without internet)
#   OUT         where gpu.json goes (default benchmarks/results)
# The worker part needs Java 17 and the Kafka jars that `clickvec broker start` fetches;
# without Java it is left out and the JSON says so.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
VENV=.venv-gpu

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  || { echo "error: nvidia-smi found no GPU on this machine" >&2; exit 2; }

pip_args=(-q)
if [[ -n "${WHEELHOUSE:-}" ]]; then pip_args+=(--no-index --find-links "$WHEELHOUSE"); fi

# A venv that sees the machine's own packages (torch, numpy, onnx where preinstalled).
# onnxruntime and onnxruntime-gpu install the same module: a preinstalled CPU build would
# shadow the GPU one, so it goes first; the gpu extra brings the CUDA and cuDNN libraries.
[[ -x $VENV/bin/python ]] || "$PY" -m venv --system-site-packages "$VENV"
if ! "$VENV/bin/python" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null; then
  "$VENV/bin/python" -m pip uninstall -q -y onnxruntime >/dev/null 2>&1 || true
fi
"$VENV/bin/python" -m pip install "${pip_args[@]}" -e '.[train,gpu]' 2>&1 | grep -v "already satisfied" || true
"$VENV/bin/python" -c 'import onnxruntime as o, sys; p=o.get_available_providers(); print("onnxruntime", o.__version__, p); sys.exit("CUDAExecutionProvider" not in p)' \
  || { echo "error: onnxruntime-gpu is installed but has no CUDAExecutionProvider (CUDA or cuDNN libraries missing?)" >&2; exit 2; }

args=("$@")
if ! command -v java >/dev/null 2>&1 && [[ " ${args[*]} " != *" --no-worker "* ]]; then
  echo "no java on this machine: the worker part is left out" >&2
  args+=(--no-worker)
fi
mkdir -p "$OUT"
timeout 280 "$VENV/bin/python" -m benchmarks.gpu --out "$OUT/gpu.json" "${args[@]}"
