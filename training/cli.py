"""`clickvec train`: flags and an optional JSON config file -> one frozen TrainConfig -> train.

    clickvec train --synthetic-users 5000 --out runs/demo
    torchrun --nproc_per_node 2 -m clickvec.training.cli --data events.parquet --out runs/ddp
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from clickvec.training.config import TrainConfig, load_config_file


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clickvec train", description="Train the LSTM behaviour encoder.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="event file (parquet / jsonl / csv) or sequence file")
    src.add_argument("--synthetic-users", type=int, help="generate N users with clickvec.synth")
    p.add_argument("--synthetic-items", type=int)
    p.add_argument("--out", help="run directory, e.g. runs/NAME")
    p.add_argument("--config", help="JSON file of TrainConfig fields; flags override it")
    p.add_argument("--split", choices=("loo", "time"))
    p.add_argument("--cutoff-quantile", type=float)
    p.add_argument("--hash-buckets", type=int)
    p.add_argument("--min-item-count", type=int)
    p.add_argument("--max-len", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--hidden", type=int)
    p.add_argument("--z-dim", type=int)
    p.add_argument("--item-dim", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--dropout", type=float)
    p.add_argument("--item-init-std", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--lr-schedule", choices=("cosine", "constant"))
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--min-events", type=int)
    p.add_argument("--vae", action="store_true", default=None)
    p.add_argument("--loss", choices=("full", "sampled"))
    p.add_argument("--num-negatives", type=int)
    p.add_argument("--item-weight", type=float)
    p.add_argument("--type-weight", type=float)
    p.add_argument("--time-weight", type=float)
    p.add_argument("--repeat-weight", type=float)
    p.add_argument("--kl-weight", type=float)
    p.add_argument("--patience", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--num-threads", type=int)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--resume", action="store_true", default=None)
    return p


def resolve(argv: list[str]) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    base: dict = {}
    cfg_file = args.pop("config")
    if cfg_file:
        base = load_config_file(cfg_file)
    merged = {**base, **{k: v for k, v in args.items() if v is not None}}
    merged.setdefault("out", "runs/default")
    return TrainConfig.from_dict(merged)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = resolve(argv)
    except ValueError as e:
        print(f"clickvec train: {e}", file=sys.stderr)
        return 2
    from clickvec.training.train import (  # torch imported only once the flags are valid
        dist_env,
        train,
    )

    if dist_env()[0] == 0:
        print("training config:\n" + json.dumps(cfg.to_dict(), indent=2, sort_keys=True), flush=True)
    result = train(cfg)
    if result:
        t = result["test"]
        k = cfg.eval_k
        print(json.dumps({
            "test_model": t["model"]["sampled"] | t["model"]["full"],
            "test_markov": t["markov"]["sampled"] | t["markov"]["full"],
            "test_popularity": t["popularity"]["sampled"] | t["popularity"]["full"],
            f"margin_sampled_hr@{k}_vs_markov": result["margins"].get(f"sampled_hr@{k}_vs_markov"),
            "out": cfg.out,
        }, indent=2))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
