"""Training throughput of the default-size encoder on CPU: a fixed number of optimizer steps
on synthetic data, written to benchmarks/results/train_throughput.json.

    .venv/bin/python benchmarks/train_throughput.py [--steps 60] [--users 3000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from clickvec.training.config import TrainConfig
from clickvec.training.data import bucket_batches, load_histories, make_split
from clickvec.training.model import Encoder
from clickvec.training.train import Objective, model_config, seed_everything

from clickvec.devtools.synth import SynthConfig, generate_table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--users", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loss", choices=("full", "sampled"), default="full")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(synthetic_users=args.users, loss=args.loss)  # default model size and batch
    seed_everything(cfg.seed, cfg.deterministic)
    split = make_split(load_histories(generate_table(SynthConfig(n_users=args.users, seed=cfg.seed))), "loo")
    enc = Encoder(model_config(cfg, split))
    obj = Objective(enc, cfg)
    opt = torch.optim.AdamW(enc.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(0)

    def batches():
        while True:
            yield from bucket_batches(split.train, cfg.batch_size, cfg.max_len, rng)

    it = batches()
    seqs = events = 0
    t0 = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            t0 = time.perf_counter()
            seqs = events = 0
        b = next(it)
        arrs = (b.item, b.etype, b.gap, b.next_item, b.next_type, b.next_log_gap)
        loss, _ = obj(*[torch.from_numpy(a) for a in arrs])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(enc.parameters(), cfg.grad_clip)
        opt.step()
        seqs += len(b.lengths)
        events += b.n_targets
    dt = time.perf_counter() - t0
    n_params = sum(p.numel() for p in enc.parameters())
    result = {
        "benchmark": "train_throughput",
        "steps": args.steps,
        "batch_size": cfg.batch_size,
        "max_len": cfg.max_len,
        "loss": args.loss,
        "seconds": dt,
        "sequences_per_s": seqs / dt,
        "events_per_s": events / dt,
        "steps_per_s": args.steps / dt,
        "model": {"config": enc.cfg.to_dict(), "parameters": n_params, "bytes_f32": n_params * 4},
        "data": {"synthetic_users": args.users, "train_events": split.info["train_events"]},
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("sequences_per_s", "events_per_s", "steps_per_s", "seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
