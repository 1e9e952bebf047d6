"""Model quality on a real sequence file: `clickvec train`'s recipe (picked from the data),
model vs popularity vs Markov under the three protocols, beside the published ICLRec figure
where the file is one of the S3-Rec / ICLRec datasets. Writes benchmarks/results/real_NAME.json.

    .venv/bin/python benchmarks/real_data.py --data PATH/beauty.txt [--threads 2] [-- TRAIN FLAGS]

The data is not in the repository (see training/README.md for where it comes from); the
benchmark reads it from the path given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from clickvec.training.cli import resolve
from clickvec.training.train import train

RESULTS = Path(__file__).parent / "results"
# Full ranking over all items, the user's seen items excluded (leave-one-out), HR@10 / NDCG@10,
# from the ICLRec repository's README, on these exact files.
PUBLISHED = {"beauty": {"model": "ICLRec", "hr@10": 0.0744, "ndcg@10": 0.0403},
             "sports": {"model": "ICLRec", "hr@10": 0.0437, "ndcg@10": 0.0238}}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def record(name: str, data: Path, flags: list[str], run_dir: Path, r: dict, wall: float,
           loads: tuple | None) -> dict:
    """The benchmark's JSON from a finished run (its metrics.json dict `r`)."""
    t = r["test"]
    k = int(r["test"].get("k", 10))
    return {
        "benchmark": "real_data", "data": str(data.name), "command_flags": flags,
        "recipe": r["recipe"], "config": json.loads((run_dir / "config.json").read_text()),
        "test": {who: {p: t[who][p] for p in t["protocols"]} for who in ("model", "popularity", "markov")},
        "published": PUBLISHED.get(name.lower()),
        "reached_published": ({m: t["model"]["full_seen_excluded"][m] >= PUBLISHED[name.lower()][m]
                               for m in (f"hr@{k}", f"ndcg@{k}")} if name.lower() in PUBLISHED else None),
        "beats_markov": r["beats_markov"], "stop_reason": r["stop_reason"], "epochs_run": r["epochs_run"],
        "epochs_planned": r["epochs_planned"], "best_epoch": r["best_epoch"],
        "wall_seconds": wall, "training_seconds": r["training_seconds"], "throughput": r["throughput"],
        "compression": r["compression"], "item_nll": t["model"]["item_nll"], "split": r["split"],
        "curve": [{key: h[key] for key in h if key in ("epoch", "train_loss", "train_seconds")
                   or key.startswith("model.full_seen_excluded") or key.startswith("model.sampled")}
                  for h in r["history"]],
        "machine": machine(), "load_average_start": loads[0] if loads else None,
        "load_average_end": loads[1] if loads else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="sequence file, e.g. beauty.txt")
    ap.add_argument("--name", help="result name (default: the file's stem)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--out", type=Path, default=Path("runs"), help="parent of the run directory (default runs/)")
    ap.add_argument("--from-run", type=Path, metavar="DIR",
                    help="write the JSON from a finished `clickvec train` run directory instead of training "
                         "(its metrics.json; load averages unknown)")
    ap.add_argument("train_flags", nargs="*", help="extra `clickvec train` flags, after --")
    args = ap.parse_args()
    name = args.name or args.data.stem
    if args.from_run:
        r = json.loads((args.from_run / "metrics.json").read_text())
        result = record(name, args.data, args.train_flags, args.from_run, r, r["wall_seconds"], None)
    else:
        cfg = resolve(["--data", str(args.data), "--out", str(args.out / f"real_{name}"), "--no-progress",
                       "--num-threads", str(args.threads), *args.train_flags])
        load0, t0 = os.getloadavg(), time.perf_counter()
        r = train(cfg)
        wall = time.perf_counter() - t0
        result = record(name, args.data, args.train_flags, Path(cfg.out), r, wall, (load0, os.getloadavg()))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"real_{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"test": result["test"], "published": result["published"],
                      "wall_seconds": round(result["wall_seconds"])}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
