"""The training configuration: one frozen object, resolved from defaults < config file < flags.

The resolved object is printed at start-up and saved as `config.json` in the run directory,
so every run carries its own recipe.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from clickvec.training.model import Architecture

# The ranking protocols every evaluation reports, each under its own key:
# "sampled": the true item against 100 items drawn uniformly from those the user has not
# interacted with (SASRec); "full": against the whole catalogue; "full_seen_excluded":
# against the catalogue less the items in the user's input history (S3-Rec / ICLRec).
PROTOCOLS = ("sampled", "full", "full_seen_excluded")


@dataclass(frozen=True)
class TrainConfig(Architecture):
    """Training settings; the model's fields (item_dim ... input_dropout) come from Architecture."""

    # data
    data: str | None = None  # event file (parquet/jsonl/csv via clickvec.eventfile) or sequence file
    synthetic_users: int = 0  # > 0: generate data with clickvec.synth instead of --data
    synthetic_items: int = 0  # 0: the generator's default
    out: str = "runs/default"
    # "auto": pick a recipe from training/recipes/ by what the training split holds; a name
    # or a JSON path: that recipe; "none": these defaults. A recipe never overrides a
    # field named in `pinned` (the CLI pins every flag and config-file key given).
    recipe: str = "none"
    pinned: tuple[str, ...] = ()
    split: str = "loo"  # "loo" (leave-one-out) or "time"
    cutoff_quantile: float = 0.9  # time split: events with ts below this quantile train
    min_events: int = 3  # users with fewer events only train (leave-one-out)
    hash_buckets: int = 0  # > 0: hash items into N buckets instead of a vocabulary
    min_item_count: int = 1  # vocabulary: items seen fewer times in training map to OOV
    # Training only: keep the last max_len events of long histories. Evaluation and the
    # stream read whole histories, so a cap far below typical lengths trains the LSTM on
    # shorter runs than it is then asked to carry.
    max_len: int = 200
    # The model's item embeddings start at std 0.05, which suits the output (dot-product)
    # side but leaves the item too faint in the LSTM input next to the type and gap
    # embeddings (std 1): training then sits on a popularity plateau for epochs.
    item_init_std: float = 0.5  # 0: keep the model's initialisation
    # "transitions": start from the training split's first-order transitions (item
    # embeddings from their PMI's eigenvectors, LSTM units that copy the current item into z:
    # training/warmstart.py), so the scores start close to Markov's; "random": item_init_std.
    item_init: str = "random"
    # objectives
    loss: str = "full"  # "full" softmax CE or "sampled" softmax
    num_negatives: int = 256  # sampled softmax: negatives per batch, drawn by popularity (logQ-corrected)
    item_weight: float = 1.0
    type_weight: float = 0.2
    time_weight: float = 0.1
    # Auxiliary CE of the *current* item through the same next-item scores (from z), for
    # data where the next event often repeats the item just seen (funnel steps): without
    # it the scores rank that item first too rarely. It costs calibration; 0 turns it off.
    repeat_weight: float = 0.3
    # A recipe's repeat_weight applies only when at least this share of next events in the
    # training split repeat the current item; below it the repeat objective is switched off.
    repeat_min_rate: float = 0.05
    kl_weight: float = 1e-3
    bag_weight: float = 0.0  # > 0: train the bag-of-items head (last distinct items from z)
    # optimisation
    epochs: int = 20
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.1
    lr_schedule: str = "constant"  # "constant" or "cosine" (to 2% of lr over `epochs`)
    warmup_steps: int = 0
    grad_clip: float = 5.0
    # Early stopping and best.pt: the validation figure to maximise, "<protocol>.<metric>".
    select_metric: str = "sampled.ndcg@10"
    patience: int = 3  # epochs without a better select_metric before stopping
    max_minutes: float = 0.0  # 0: no wall-clock budget
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 0  # 0: leave torch's default
    deterministic: bool = True
    # evaluation
    num_eval_negatives: int = 100
    eval_k: int = 10
    eval_batch_size: int = 512
    eval_seed: int = 12345
    progress: bool = True
    resume: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pinned"] = list(self.pinned)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known keys: {sorted(known)}")
        if "pinned" in d:
            d = {**d, "pinned": tuple(d["pinned"])}
        return cls(**d).validated()

    def merged(self, overrides: dict[str, Any]) -> TrainConfig:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None}).validated()

    def validated(self) -> TrainConfig:
        if self.split not in ("loo", "time"):
            raise ValueError(f"split must be 'loo' or 'time', not {self.split!r}")
        if self.loss not in ("full", "sampled"):
            raise ValueError(f"loss must be 'full' or 'sampled', not {self.loss!r}")
        if self.select_metric.split(".")[0] not in PROTOCOLS or "." not in self.select_metric:
            raise ValueError(f"select_metric is '<protocol>.<metric>' with protocol in {PROTOCOLS}, "
                             f"not {self.select_metric!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', not {self.lr_schedule!r}")
        if self.item_init not in ("random", "transitions"):
            raise ValueError(f"item_init must be 'random' or 'transitions', not {self.item_init!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if not 0.0 < self.cutoff_quantile < 1.0:
            raise ValueError("cutoff_quantile must lie in (0, 1)")
        if self.max_len < 2:
            raise ValueError("max_len must be >= 2")
        if self.data is None and self.synthetic_users <= 0:
            raise ValueError("give --data PATH or --synthetic-users N")
        return self

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def load_config_file(path: str | Path) -> dict[str, Any]:
    d = json.loads(Path(path).read_text())
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a training config file is a JSON object")
    return {k.replace("-", "_"): v for k, v in d.items()}
