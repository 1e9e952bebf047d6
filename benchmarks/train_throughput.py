"""Training throughput on a 20k-item catalogue: full softmax against sampled softmax (item-
frequency proposal, logQ correction), each trained for the same wall time from the same
start, then scored on the valid split. Writes benchmarks/results/train_throughput.json.

    .venv/bin/python benchmarks/train_throughput.py [--seconds 60] [--users 5000] [--items 20000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from clickvec.devtools.synth import SynthConfig, generate_table
from clickvec.training.config import TrainConfig
from clickvec.training.data import bucket_batches, make_split
from clickvec.training.evaluate import evaluate
from clickvec.training.model import Encoder
from clickvec.training.objective import Objective, item_log_q
from clickvec.training.readers import load_histories
from clickvec.training.train import model_config, seed_everything


def run(cfg: TrainConfig, split, seconds: float) -> dict:
    """Train from the seeded start for `seconds` of wall time; throughput and valid figures."""
    seed_everything(cfg.seed, cfg.deterministic)
    enc = Encoder(model_config(cfg, split))
    obj = Objective(enc, cfg, item_log_q(split.train, split.spec.n_items))
    opt = torch.optim.AdamW(enc.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(0)
    seqs = events = steps = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for b in bucket_batches(split.train, cfg.batch_size, cfg.max_len, rng):
            arrs = (b.item, b.etype, b.gap, b.next_item, b.next_type, b.next_log_gap)
            loss, _ = obj(*[torch.from_numpy(a) for a in arrs])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(enc.parameters(), cfg.grad_clip)
            opt.step()
            seqs, events, steps = seqs + len(b.lengths), events + b.n_targets, steps + 1
            if time.perf_counter() - t0 >= seconds:
                break
    dt = time.perf_counter() - t0
    m = evaluate(enc, split, "valid", baselines=False, max_cases=3000)
    return {"loss": cfg.loss, "num_negatives": cfg.num_negatives if cfg.loss == "sampled" else None,
            "seconds": dt, "steps": steps, "sequences_per_s": seqs / dt, "events_per_s": events / dt,
            "epochs": seqs / len(split.train),
            "valid_3000_users": {p: m["model"][p] for p in m["protocols"]}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="wall time per loss (default 60)")
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--items", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--negatives", type=int, default=1024, help="sampled softmax negatives per batch")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table = generate_table(SynthConfig(n_users=args.users, n_items=args.items, seed=0))
    split = make_split(load_histories(table), "loo")
    # The sequences recipe's model and optimiser settings (type and gap heads on: synthetic events).
    base = TrainConfig(synthetic_users=args.users, item_dim=64, hidden=128, z_dim=64, input_dropout=0.3,
                       item_init_std=0.0, max_len=50, lr=0.005, lr_schedule="constant", repeat_weight=0.0)
    full = run(base, split, args.seconds)
    sampled = run(replace(base, loss="sampled", num_negatives=args.negatives), split, args.seconds)
    load = os.getloadavg()
    result = {
        "benchmark": "train_throughput", "catalogue_items": split.spec.n_items - 2,
        "train_events": split.info["train_events"], "train_users": len(split.train),
        "batch_size": base.batch_size, "max_len": base.max_len, "equal_wall_seconds": args.seconds,
        "full": full, "sampled": sampled,
        "sampled_over_full_events_per_s": sampled["events_per_s"] / full["events_per_s"],
        "model": model_config(base, split).to_dict(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_end": load,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("full", "sampled", "sampled_over_full_events_per_s")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
