"""The training loop: data -> split -> Encoder -> objectives -> checkpoints -> metrics.

Single process by default; under `torchrun` (env WORLD_SIZE > 1) it runs DDP with gloo on
CPU and nccl on CUDA, each rank taking its own share of the length-bucketed batches.
Only rank 0 evaluates and writes; it broadcasts the stop decision to the others.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from clickvec.features import N_GAP_BUCKETS
from clickvec.training.baselines import fit_baselines
from clickvec.training.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from clickvec.training.config import TrainConfig
from clickvec.training.data import (
    Batch,
    Split,
    bucket_batches,
    event_json_bytes,
    make_split,
    synthetic_table,
)
from clickvec.training.evaluate import beats, evaluate, flat
from clickvec.training.model import Architecture, Encoder, ModelConfig
from clickvec.training.objective import Objective, item_log_q
from clickvec.training.readers import is_sequence_file, load_histories
from clickvec.training.recipe import apply_recipe
from clickvec.training.warmstart import init_from_transitions

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- setup


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this for deterministic matmuls; LSTM kernels on CUDA may still warn.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def build_split(cfg: TrainConfig, source: Any = None) -> Split:
    """Load histories (from `source`, --data or the synthetic generator) and split them."""
    table = None
    if source is None and cfg.synthetic_users > 0:
        source = table = synthetic_table(cfg.synthetic_users, cfg.seed, cfg.synthetic_items)
    elif source is None:
        source = cfg.data
    if hasattr(source, "column_names"):
        table = source
    elif isinstance(source, (str, Path)) and table is None:
        if not is_sequence_file(source):
            from clickvec import eventfile

            table = eventfile.read_table(source)
            source = table
    histories = load_histories(source)
    split = make_split(histories, cfg.split, cfg.hash_buckets, cfg.min_item_count, cfg.cutoff_quantile,
                       cfg.min_events)
    split.info["event_json_bytes"] = event_json_bytes(histories, table, seed=cfg.seed)
    return split


def model_config(cfg: TrainConfig, split: Split) -> ModelConfig:
    arch = {f.name: getattr(cfg, f.name) for f in fields(Architecture)}
    return ModelConfig(split.spec.n_items, split.spec.n_event_types, N_GAP_BUCKETS, **arch)


def _to(batch: Batch, device: torch.device) -> list[torch.Tensor]:
    arrs = (batch.item, batch.etype, batch.gap, batch.next_item, batch.next_type, batch.next_log_gap)
    return [torch.from_numpy(a).to(device, non_blocking=True) for a in arrs]


# ---------------------------------------------------------------------------- train


@dataclass
class Loop:
    """Loop state, saved in last.pt for --resume."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    start_epoch: int = 0
    step: int = 0
    train_seconds: float = 0.0
    seqs_seen: int = 0
    events_seen: int = 0
    stop_reason: str = "epochs"
    start: dict[str, Any] = field(default_factory=dict)  # valid figures of the warm start (epoch -1)

    def resume_state(self) -> dict[str, Any]:
        keep = ("history", "best_score", "best_epoch", "bad_epochs", "train_seconds", "seqs_seen", "events_seen")
        return {k: getattr(self, k) for k in keep} | {"torch_rng": torch.get_rng_state()}


@dataclass
class Run:
    """Everything one training run holds: config, data, model, optimiser, loop state."""

    cfg: TrainConfig
    split: Split
    encoder: Encoder
    objective: nn.Module
    opt: torch.optim.Optimizer
    device: torch.device
    rank: int
    world: int
    out: Path
    recipe: dict[str, Any]
    loop: Loop = field(default_factory=Loop)
    amp_dtype: torch.dtype = torch.float32
    scaler: Any = None


def _init_process(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    rank, world, local_rank = dist_env()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device, local_rank)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    seed_everything(cfg.seed, cfg.deterministic)
    return rank, world, device


def setup(cfg: TrainConfig, source: Any = None) -> Run:
    """Data, recipe, model, optimiser and (with --resume) the loop state of last.pt."""
    rank, world, device = _init_process(cfg)
    split = build_split(cfg, source)
    cfg, recipe = apply_recipe(cfg, split.info)
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
        (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
        (out / "vocab.json").write_text(json.dumps(split.spec.to_json()) + "\n")
        print(f"recipe: {recipe['name']} ({recipe['reason']})", flush=True)
        print("training config:\n" + json.dumps(cfg.to_dict(), indent=2, sort_keys=True), flush=True)
        log.info("split %s: %s", cfg.split, split.info)
    torch.manual_seed(cfg.seed)  # same initial weights whatever the data loading drew
    encoder = Encoder(model_config(cfg, split))
    if cfg.item_init_std > 0:
        with torch.no_grad():
            nn.init.normal_(encoder.item_emb.weight, std=cfg.item_init_std)
            encoder.item_emb.weight[0].zero_()  # padding
    if cfg.item_init == "transitions" and not cfg.resume:
        log.info("initialised from the training transitions: %s", init_from_transitions(encoder, split.train, cfg.seed))
    encoder.to(device)
    objective: nn.Module = Objective(encoder, cfg, item_log_q(split.train, split.spec.n_items)).to(device)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        objective = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(encoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_amp = device.type == "cuda"
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if use_amp else torch.float32
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    run = Run(cfg, split, encoder, objective, opt, device, rank, world, out, recipe, Loop(), amp_dtype, scaler)
    if cfg.resume and (out / "last.pt").exists():
        _resume(run)
    return run


def _resume(run: Run) -> None:
    payload = read_checkpoint(run.out / "last.pt")
    run.encoder.load_state_dict(payload["state_dict"])
    run.opt.load_state_dict(payload["optimizer"])
    r = payload["resume"]
    torch.set_rng_state(r.pop("torch_rng"))
    run.loop = Loop(**r, start_epoch=payload["epoch"] + 1, step=payload["step"])
    log.info("resumed from %s at epoch %d", run.out / "last.pt", run.loop.start_epoch)


def lr_factor(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Linear warm-up, then constant or cosine down to 2% of the peak."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.lr_schedule == "constant":
        return warm
    return warm * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total_steps))))


def horizon(run: Run, planned: int, deadline: float, started: tuple[float, int]) -> int:
    """Steps the cosine schedule anneals over: the planned ones, or fewer where the
    wall-clock budget (at the step rate seen so far, validation included) will stop the
    run first, so a capped run still ends on a low learning rate rather than mid-plateau.
    Single process only: under DDP every rank must apply the same learning rate."""
    t0, step0 = started
    done, now = run.loop.step - step0, time.perf_counter()
    if not math.isfinite(deadline) or run.world > 1 or done < 20:
        return planned
    return max(1, min(planned, run.loop.step + int((deadline - now) * done / max(now - t0, 1e-9))))


def train_epoch(run: Run, epoch: int, deadline: float, started: tuple[float, int]) -> tuple[float, bool]:
    """One pass over the training users; (mean loss per sequence, stopped by the deadline)."""
    cfg, loop, enc = run.cfg, run.loop, run.encoder
    enc.train()
    rng = np.random.default_rng([cfg.seed, epoch])
    batches = list(bucket_batches(run.split.train, cfg.batch_size, cfg.max_len, rng, run.rank, run.world))
    planned = max(1, cfg.epochs * len(batches))
    bar = tqdm(batches, desc=f"epoch {epoch}", disable=not cfg.progress or run.rank != 0, leave=False,
               dynamic_ncols=True)
    loss_sum = torch.zeros(2, dtype=torch.float64)
    t0, timed_out = time.perf_counter(), False
    for batch in bar:
        with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.device.type == "cuda"):
            loss, parts = run.objective(*_to(batch, run.device))
        for g in run.opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(cfg, loop.step, horizon(run, planned, deadline, started))
        run.opt.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            run.scaler.unscale_(run.opt)
            nn.utils.clip_grad_norm_(enc.parameters(), cfg.grad_clip)
        run.scaler.step(run.opt)
        run.scaler.update()
        loop.step += 1
        lv = float(loss.detach())
        loss_sum += torch.tensor([lv * len(batch.lengths), len(batch.lengths)], dtype=torch.float64)
        loop.seqs_seen += len(batch.lengths) * run.world
        loop.events_seen += batch.n_targets * run.world
        bar.set_postfix(loss=f"{lv:.4f}", item=f"{float(parts['item']):.3f}")
        if time.perf_counter() > deadline:
            timed_out = True
            break
    loop.train_seconds += time.perf_counter() - t0
    if run.world > 1:
        import torch.distributed as dist

        dist.all_reduce(loss_sum)
    return float(loss_sum[0] / max(loss_sum[1], 1.0)), timed_out


def validate(run: Run, epoch: int, train_loss: float, baselines: list, eval_kw: dict[str, Any]) -> bool:
    """Rank 0: score the valid split, keep best.pt and last.pt; True when patience ran out."""
    cfg, loop = run.cfg, run.loop
    m = evaluate(run.encoder, run.split, "valid", baselines=baselines, **eval_kw)
    fm = flat(m)
    loop.history.append({"epoch": epoch, "step": loop.step, "train_loss": train_loss,
                         "train_seconds": loop.train_seconds,
                         **{k: fm[k] for k in sorted(fm) if not k.startswith("compression")}})
    score = fm[f"model.{cfg.select_metric}"]
    k = cfg.eval_k
    log.info("epoch %d loss %.4f valid %s %.4f | full_seen_excluded HR@%d %.4f NDCG@%d %.4f (markov %.4f %.4f)",
             epoch, train_loss, cfg.select_metric, score, k, fm[f"model.full_seen_excluded.hr@{k}"], k,
             fm[f"model.full_seen_excluded.ndcg@{k}"], fm[f"markov.full_seen_excluded.hr@{k}"],
             fm[f"markov.full_seen_excluded.ndcg@{k}"])
    ckpt = {"epoch": epoch, "step": loop.step}
    if score > loop.best_score:
        loop.best_score, loop.best_epoch, loop.bad_epochs = score, epoch, 0
        save_checkpoint(run.out / "best.pt", run.encoder, run.split.spec, cfg.to_dict(), m, **ckpt)
    elif loop.best_epoch >= 0:  # a warm start still best does not count against patience:
        loop.bad_epochs += 1  # its first epochs fall below it before they rise above (README)
    save_checkpoint(run.out / "last.pt", run.encoder, run.split.spec, cfg.to_dict(), m, **ckpt,
                    optimizer=run.opt.state_dict(), resume=loop.resume_state())
    return loop.bad_epochs >= cfg.patience


def _broadcast_stop(run: Run, stop: bool) -> bool:
    if run.world == 1:
        return stop
    import torch.distributed as dist

    flag = torch.tensor([1.0 if stop else 0.0])
    dist.broadcast(flag, 0)
    return bool(flag[0] > 0)


def train(cfg: TrainConfig, source: Any = None) -> dict[str, Any]:
    """Train, checkpoint, evaluate the test split with best.pt; returns metrics.json's dict
    (on rank 0; other ranks return {})."""
    t_start = time.perf_counter()
    run = setup(cfg, source)
    cfg, loop = run.cfg, run.loop
    valid_baselines = fit_baselines(run.split.train, run.split.spec.n_items)
    eval_kw = {"device": run.device, "k": cfg.eval_k, "num_negatives": cfg.num_eval_negatives,
               "seed": cfg.eval_seed, "batch_size": cfg.eval_batch_size}
    # --max-minutes bounds the whole run (reading the data, validations and the final test
    # included): training stops early enough for one more validation (as long as the last
    # one) and the test ranking (as long as the first validation, which also scored the
    # baselines; later ones reuse those scores).
    deadline = t_start + cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
    started, valid_s = (time.perf_counter(), loop.step), []
    if cfg.item_init == "transitions" and loop.start_epoch == 0 and run.rank == 0:
        # A warm start is already a model: best.pt starts from it, so training has to beat
        # it on valid to replace it (best_epoch -1 in metrics.json says it did not).
        t_valid = time.perf_counter()
        validate(run, -1, float("nan"), valid_baselines, eval_kw)
        loop.start = loop.history.pop()
        valid_s.append(time.perf_counter() - t_valid)
    for epoch in range(loop.start_epoch, cfg.epochs):
        reserve = valid_s[0] + valid_s[-1] if valid_s else 0.0
        if valid_s and run.world == 1 and time.perf_counter() > deadline - reserve:
            loop.stop_reason = "time_cap"  # no time left for an epoch: no validation of nothing new
            break
        train_loss, timed_out = train_epoch(run, epoch, deadline - reserve, started)
        t_valid = time.perf_counter()
        patience_out = validate(run, epoch, train_loss, valid_baselines, eval_kw) if run.rank == 0 else False
        if timed_out or patience_out:
            loop.stop_reason = "time_cap" if timed_out else "early_stop"
        if _broadcast_stop(run, timed_out or patience_out):
            break
        valid_s.append(time.perf_counter() - t_valid)  # every rank waited for rank 0's validation
    result = finish(run, eval_kw, time.perf_counter() - t_start) if run.rank == 0 else {}
    if run.world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return result


def finish(run: Run, eval_kw: dict[str, Any], wall_seconds: float) -> dict[str, Any]:
    """Test best.pt against the baselines; write metrics.json and the report; warn plainly."""
    cfg, loop, split = run.cfg, run.loop, run.split
    best, _, payload = load_checkpoint(run.out / "best.pt")
    best.to(run.device)
    test = evaluate(best, split, "test", baselines=fit_baselines(split.train, split.spec.n_items), **eval_kw)
    n_params = sum(p.numel() for p in best.parameters())
    result = {
        "stop_reason": loop.stop_reason,
        "epochs_run": len(loop.history),
        "epochs_planned": cfg.epochs,
        "beats_markov": beats(test, "markov"),
        "recipe": run.recipe,
        "test": test,
        "margins": test.get("margins", {}),
        "compression": test["compression"],
        "best_epoch": payload.get("epoch", loop.best_epoch),
        "select_metric": cfg.select_metric,
        "valid_at_best": payload.get("metrics", {}),
        "valid_at_start": loop.start,
        "training_seconds": loop.train_seconds,
        "wall_seconds": wall_seconds,
        "throughput": {"sequences_per_s": loop.seqs_seen / max(loop.train_seconds, 1e-9),
                       "events_per_s": loop.events_seen / max(loop.train_seconds, 1e-9)},
        "world_size": run.world,
        "device": str(run.device),
        "amp": str(run.amp_dtype).replace("torch.", "") if run.device.type == "cuda" else None,
        "model": {"config": best.cfg.to_dict(), "parameters": n_params, "bytes_f32": n_params * 4},
        "split": split.info,
        "history": loop.history,
        "torch": torch.__version__,
    }
    (run.out / "metrics.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    from clickvec.training.report import write_report

    write_report(run.out, result, cfg)
    for line in warnings(result):
        print(f"WARNING: {line}", flush=True)
    return result


def warnings(result: dict[str, Any]) -> list[str]:
    """Plain lines for what the reader of a run must not miss."""
    out = []
    if result["stop_reason"] == "time_cap":
        out.append(f"training stopped by the time cap after {result['epochs_run']} of "
                   f"{result['epochs_planned']} epochs; the model may be undertrained")
    if not result["beats_markov"]:
        t = result["test"]
        lost = [f"{p}.{m}" for p in t["protocols"] for m, v in t["markov"][p].items() if t["model"][p][m] <= v]
        out.append(f"the model does not beat Markov on the test split ({', '.join(lost)})")
    return out
