"""Checkpoint format shared by `training` (writer) and `export` (reader).

A run directory `runs/NAME/` holds `best.pt` and `last.pt`. Each is a safetensors file
(https://huggingface.co/docs/safetensors): the tensors under named keys and the rest as
JSON in the file's metadata, so loading one never runs pickle (a pickled checkpoint could
execute code when loaded). Its payload, as `load_checkpoint` returns it:
  model_config: ModelConfig.to_dict()
  state_dict:   Encoder.state_dict()               (tensors "model.<name>")
  feature_spec: FeatureSpec.to_json()
  train_config: the resolved training configuration (dict)
  metrics:      evaluation metrics of that checkpoint (dict, may be empty)
  step/epoch:   progress, for resume
  optimizer:    last.pt only: the optimizer's state_dict (tensors "optimizer.<param>.<name>")
  resume:       last.pt only: the loop state, its torch RNG state a tensor "resume.torch_rng"
plus `config.json`, `vocab.json` (the feature spec) and `metrics.json` beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from clickvec.errors import ClickvecError
from clickvec.features import FeatureSpec
from clickvec.training.model import Encoder, ModelConfig

FORMAT = "clickvec-checkpoint/1"


class CheckpointError(ClickvecError):
    """A checkpoint file that is not clickvec's safetensors format (e.g. a pickle)."""


def _flatten(payload: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split the payload into named tensors and the JSON-able rest."""
    tensors = {f"model.{k}": v for k, v in payload.pop("state_dict").items()}
    opt = payload.pop("optimizer", None)
    if opt is not None:
        for pid, st in opt["state"].items():
            for name, v in st.items():
                tensors[f"optimizer.{pid}.{name}"] = torch.as_tensor(v)
        payload["optimizer"] = {"param_groups": opt["param_groups"]}
    resume = payload.get("resume")
    if resume is not None and "torch_rng" in resume:
        resume = dict(resume)
        tensors["resume.torch_rng"] = resume.pop("torch_rng")
        payload["resume"] = resume
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, payload


def _unflatten(tensors: dict[str, torch.Tensor], payload: dict[str, Any]) -> dict[str, Any]:
    payload["state_dict"] = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    if "optimizer" in payload:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optimizer."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        payload["optimizer"] = {"state": state, "param_groups": payload["optimizer"]["param_groups"]}
    if "resume.torch_rng" in tensors:
        payload["resume"]["torch_rng"] = tensors["resume.torch_rng"]
    return payload


def save_checkpoint(
    path: str | Path,
    model: Encoder,
    spec: FeatureSpec,
    train_config: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    **extra: Any,
) -> None:
    """Write the checkpoint atomically (a temporary file renamed over `path`). `extra` may
    hold `optimizer` (a state_dict) and `resume` (JSON-able, plus `torch_rng`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model_config": model.cfg.to_dict(),
        "state_dict": model.state_dict(),
        "feature_spec": spec.to_json(),
        "train_config": dict(train_config),
        "metrics": dict(metrics or {}),
        **extra,
    }
    tensors, rest = _flatten(payload)
    meta = {"format": FORMAT, "payload": json.dumps(rest, default=float)}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The payload of a checkpoint file (tensors on CPU). Anything but clickvec's safetensors
    format, a pickle included, is refused with a CheckpointError, never unpickled."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a clickvec checkpoint (safetensors; pickled checkpoints "
                              f"are refused, retrain with this version): {str(e).splitlines()[0]}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a clickvec checkpoint "
                              f"(format {meta.get('format')!r}, expected {FORMAT!r})")
    return _unflatten(tensors, json.loads(meta["payload"]))


def load_checkpoint(path: str | Path) -> tuple[Encoder, FeatureSpec, dict[str, Any]]:
    """Load `best.pt` / `last.pt` (or a run directory: best.pt, else last.pt).
    Returns the model in eval mode on CPU, its feature spec and the payload."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").exists() else path / "last.pt"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: train a model first (clickvec train)")
    payload = read_checkpoint(path)
    model = Encoder(ModelConfig(**payload["model_config"]))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, FeatureSpec.from_json(payload["feature_spec"]), payload
