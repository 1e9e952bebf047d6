"""`clickvec train`: flags and an optional JSON config file -> one frozen TrainConfig -> train.

    clickvec train --data events.parquet --out runs/NAME      # recipe picked from the data
    clickvec train --synthetic-users 5000 --out runs/demo
    torchrun --nproc_per_node 2 -m clickvec.training.cli --data events.parquet --out runs/ddp

Every flag and config-file key given is pinned: the recipe does not override it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from typing import Any

from clickvec.training.config import PROTOCOLS, TrainConfig, load_config_file

DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}
CLI_DEFAULTS = {"recipe": "auto"}  # the CLI picks a recipe; the Python API keeps its config as given
RECIPE_NOTE = " (the recipe may set it)"

# (flag, type or choices, help); the default shown comes from TrainConfig.
FLAGS: list[tuple[str, Any, str]] = [
    ("--synthetic-items", int, "items of the synthetic catalogue (0: the generator's default)"),
    ("--out", str, "run directory, e.g. runs/NAME"),
    ("--recipe", str, "auto (pick from the data), none (the defaults shown here), a recipe name in "
                      "training/recipes/ (events, sequences) or a JSON recipe file"),
    ("--split", ("loo", "time"), "leave-one-out (last event test, second-last valid) or a time split"),
    ("--cutoff-quantile", float, "time split: events before this quantile of all timestamps train"),
    ("--hash-buckets", int, "> 0: hash items into N buckets instead of a vocabulary"),
    ("--min-item-count", int, "items seen fewer times in training map to OOV"),
    ("--max-len", int, "training keeps the last N events of a history (evaluation reads all)"),
    ("--epochs", int, "epochs planned"),
    ("--batch-size", int, "users per batch (per rank under DDP)"),
    ("--lr", float, "peak learning rate (AdamW)"),
    ("--hidden", int, "LSTM hidden size"),
    ("--z-dim", int, "size of the published vector z"),
    ("--item-dim", int, "item embedding size (input and output, tied)"),
    ("--layers", int, "LSTM layers"),
    ("--dropout", float, "dropout on the LSTM output before z (and between layers)"),
    ("--input-dropout", float, "dropout on the event embeddings entering the LSTM"),
    ("--item-init-std", float, "std of the item embeddings at start (0: the model's 0.05)"),
    ("--item-init", ("random", "transitions"), "start: random item embeddings, or from the training "
                                               "split's item transitions (scores start near Markov's)"),
    ("--weight-decay", float, "AdamW weight decay"),
    ("--lr-schedule", ("cosine", "constant"), "learning-rate schedule after warm-up"),
    ("--warmup-steps", int, "linear warm-up steps"),
    ("--min-events", int, "users with fewer events only train"),
    ("--loss", ("full", "sampled"), "next-item loss: full softmax, or sampled softmax with logQ correction"),
    ("--num-negatives", int, "sampled softmax: negatives per batch"),
    ("--item-weight", float, "weight of the next-item loss"),
    ("--type-weight", float, "weight of the next-event-type loss"),
    ("--time-weight", float, "weight of the log-gap loss"),
    ("--repeat-weight", float, "weight of the current item's CE under the next-item scores"),
    ("--repeat-min-rate", float, "the recipe's repeat objective only above this training repeat rate"),
    ("--kl-weight", float, "VAE KL weight"),
    ("--bag-weight", float, "> 0: train a bag-of-items head decoding the last items from z"),
    ("--select-metric", str, f"valid figure for best.pt and early stopping, <protocol>.<metric>, "
                             f"protocol in {', '.join(PROTOCOLS)}"),
    ("--patience", int, "epochs without a better select-metric before stopping"),
    ("--seed", int, "seed of python, numpy and torch"),
    ("--max-minutes", float, "wall-clock budget of the whole run: data, training, validation and the test ranking (0: none)"),
    ("--device", ("auto", "cpu", "cuda"), "where to train"),
    ("--num-threads", int, "torch CPU threads (0: torch's default)"),
]


def _default(name: str) -> str:
    d = CLI_DEFAULTS.get(name, DEFAULTS[name])
    return f"default: {d}" + (RECIPE_NOTE if name not in CLI_DEFAULTS and name not in NOT_IN_RECIPES else "")


NOT_IN_RECIPES = {"out", "recipe", "seed", "device", "num_threads", "synthetic_items", "split",
                  "cutoff_quantile", "hash_buckets", "min_item_count", "min_events", "repeat_min_rate"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clickvec train", description="Train the LSTM behaviour encoder.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="event file (.parquet / .jsonl / .csv) or sequence file (`user item` "
                                    "lines or one `user item item ...` line per user); default: none")
    src.add_argument("--synthetic-users", type=int, help="generate N users with clickvec.synth instead of "
                                                          "--data; default: 0")
    p.add_argument("--config", help="JSON file of TrainConfig fields; flags override it; default: none")
    for flag, kind, text in FLAGS:
        name = flag[2:].replace("-", "_")
        kw: dict[str, Any] = {"choices": kind} if isinstance(kind, tuple) else {"type": kind}
        p.add_argument(flag, help=f"{text}; {_default(name)}", **kw)
    p.add_argument("--vae", action="store_true", default=None, help="VAE head on z; default: off")
    p.add_argument("--bag-head", action="store_true", default=None,
                   help="add the bag-of-items head (trained with --bag-weight); default: off")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars; default: bars on")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from the run directory's last.pt; default: off")
    p.add_argument("--compare-with", default=None, metavar="BUNDLE",
                   help="the model bundle in service: compare it with this run on the same test cases "
                        "(compare.json in the run directory; clickvec compare); default: none")
    return p


def resolve(argv: list[str]) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    args.pop("compare_with")
    base: dict = {}
    cfg_file = args.pop("config")
    if cfg_file:
        base = load_config_file(cfg_file)
    given = {k: v for k, v in args.items() if v is not None}
    merged = {**CLI_DEFAULTS, **base, **given}
    merged["pinned"] = sorted(set(base) | set(given) | set(merged.get("pinned", ())))
    merged.setdefault("out", "runs/default")
    return TrainConfig.from_dict(merged)


def summary(result: dict[str, Any], out: str) -> dict[str, Any]:
    """The test figures by scorer and protocol, each named; the run's stop and Markov verdict."""
    t = result["test"]
    return {
        "test": {who: {p: t[who][p] for p in t["protocols"]} for who in ("model", "markov", "popularity")},
        "margins_vs_markov": {k: round(v, 3) for k, v in result["margins"].items() if k.endswith("_vs_markov")},
        "stop_reason": result["stop_reason"], "epochs_run": result["epochs_run"],
        "epochs_planned": result["epochs_planned"], "beats_markov": result["beats_markov"],
        "recipe": result["recipe"]["name"], "out": out,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = resolve(argv)
    except ValueError as e:
        print(f"clickvec train: {e}", file=sys.stderr)
        return 2
    from clickvec.errors import ClickvecError
    from clickvec.training.train import train

    try:
        result = train(cfg)
    except ClickvecError as e:  # e.g. --resume over a last.pt that is not clickvec's format
        print(f"clickvec train: {e}", file=sys.stderr)
        return 1
    if result:
        out = summary(result, cfg.out)
        compare_with = build_parser().parse_args(argv).compare_with
        if compare_with:
            out["compare"] = compare_run(compare_with, cfg, result)
        print(json.dumps(out, indent=2))
    return 0


def compare_run(old_bundle: str, cfg: TrainConfig, result: dict[str, Any]) -> dict[str, Any]:
    """The bundle in service against this run on the run's own test cases (drift across a
    rollout is visible before it), saved beside the run's metrics."""
    from pathlib import Path

    from clickvec.lifecycle.compare import against_training, markdown

    cmp = against_training(old_bundle, cfg.data, cfg.split, result["test"], k=10)
    Path(cfg.out, "compare.json").write_text(json.dumps(cmp, indent=2))
    Path(cfg.out, "compare.md").write_text("# Compared with the model in service\n\n" + markdown(cmp) + "\n")
    return {"headline": cmp["headline"], "delta": cmp["delta"], "worse": cmp["worse"]}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
