"""Recipes: named sets of training settings in `training/recipes/*.json`, picked by what the
training split holds (`data.profile`) when `recipe` is "auto".

A recipe file is {"description": ..., "settings": {TrainConfig field: value}}. Its settings
replace the config's values except the fields the user pinned (flags and config-file keys);
then the repeat objective is switched off where repeats are rare in the training split.
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from clickvec.training.config import TrainConfig

RECIPE_DIR = Path(__file__).parent / "recipes"


def available() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.json"))


def load_recipe(name: str) -> dict[str, Any]:
    """A recipe by name (a file in training/recipes/) or by path to a JSON file."""
    path = Path(name) if name.endswith(".json") else RECIPE_DIR / f"{name}.json"
    if not path.exists():
        raise ValueError(f"no recipe {name!r}: use auto, none, one of {available()} or a JSON file")
    d = json.loads(path.read_text())
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(d.get("settings", {})) - known)
    if unknown:
        raise ValueError(f"recipe {path}: unknown settings {unknown}")
    return {"name": path.stem, "file": str(path), **d}


def choose(info: dict[str, Any]) -> tuple[str, str]:
    """(recipe name, why) from the training split's profile."""
    if info.get("has_types") or info.get("has_gaps"):
        return "events", "event types or time gaps vary in the training split"
    return "sequences", "items only: one event type and no time information in the training split"


def apply_recipe(cfg: TrainConfig, info: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """The config with the chosen recipe's settings (pinned fields kept) and the recipe record
    saved as recipe.json: name, why, settings applied, the data profile behind the choice."""
    if cfg.recipe == "none":
        name, reason, settings, desc = "none", "recipe none: the config as given", {}, ""
    else:
        name, reason = choose(info) if cfg.recipe == "auto" else (cfg.recipe, "named in the config")
        r = load_recipe(name)
        name, settings, desc = r["name"], r.get("settings", {}), r.get("description", "")
    applied = {k: v for k, v in settings.items() if k not in cfg.pinned}
    new = replace(cfg, **applied)
    rate = float(info.get("repeat_rate", 0.0))
    if cfg.recipe != "none" and "repeat_weight" not in cfg.pinned and new.repeat_weight > 0 \
            and rate < cfg.repeat_min_rate:
        new = replace(new, repeat_weight=0.0)
        applied["repeat_weight"] = 0.0
        reason += (f"; repeat objective off: {rate:.1%} of next events repeat the current item "
                   f"(< repeat_min_rate {cfg.repeat_min_rate:.0%})")
    record = {"name": name, "reason": reason, "description": desc, "applied": applied,
              "pinned": sorted(cfg.pinned), "data_profile": {k: info.get(k) for k in
                                                              ("repeat_rate", "has_types", "has_gaps",
                                                               "mean_train_length", "n_items", "train_events")}}
    return new.validated(), record
