"""Checkpoint format shared by `training` (writer) and `export` (reader).

A run directory `runs/NAME/` holds `best.pt` and `last.pt`, each a dict:
  model_config: ModelConfig.to_dict()
  state_dict:   Encoder.state_dict()
  feature_spec: FeatureSpec.to_json()
  train_config: the resolved training configuration (dict)
  metrics:      evaluation metrics of that checkpoint (dict, may be empty)
  step/epoch:   progress, for resume (optimizer state under `optimizer` in last.pt)
plus `config.json`, `vocab.json` (the feature spec) and `metrics.json` beside them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clickvec.features import FeatureSpec
from clickvec.training.model import Encoder, ModelConfig


def save_checkpoint(
    path: str | Path,
    model: Encoder,
    spec: FeatureSpec,
    train_config: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    **extra: Any,
) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model_config": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "feature_spec": spec.to_json(),
        "train_config": dict(train_config),
        "metrics": dict(metrics or {}),
        **extra,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> tuple[Encoder, FeatureSpec, dict[str, Any]]:
    """Load `best.pt` / `last.pt` (or a run directory: best.pt, else last.pt).
    Returns the model in eval mode on CPU, its feature spec and the raw payload."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").exists() else path / "last.pt"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: train a model first (clickvec train)")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    model = Encoder(ModelConfig(**payload["model_config"]))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, FeatureSpec.from_json(payload["feature_spec"]), payload
