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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from clickvec.training.baselines import fit_baselines
from clickvec.training.checkpoint import load_checkpoint, save_checkpoint
from clickvec.training.config import TrainConfig
from clickvec.training.data import (
    Batch,
    Split,
    bucket_batches,
    event_json_bytes,
    load_histories,
    make_split,
    synthetic_table,
)
from clickvec.training.evaluate import evaluate, flat
from clickvec.training.model import Encoder, ModelConfig
from torch import nn
from tqdm import tqdm

from clickvec.features import N_GAP_BUCKETS

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
        from clickvec.training.data import is_sequence_file

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
    return ModelConfig(
        n_items=split.spec.n_items, n_event_types=split.spec.n_event_types, n_gap_buckets=N_GAP_BUCKETS,
        item_dim=cfg.item_dim, type_dim=cfg.type_dim, gap_dim=cfg.gap_dim, hidden=cfg.hidden,
        layers=cfg.layers, z_dim=cfg.z_dim, vae=cfg.vae, dropout=cfg.dropout,
    )


# ------------------------------------------------------------------------ objective


class Objective(nn.Module):
    """Encoder + the training objectives, so DDP wraps one forward that uses every parameter.

    Every prediction comes from z after event t and targets event t + 1: causal by the LSTM.
    `repeat_weight` adds a cross-entropy of the item of event t itself under the same
    next-item scores: still scored from z alone (no copy path), it teaches the scores to
    put the item just seen high, as Markov's self-transition counts do (funnel steps on
    one item are about 16% of next events on the synthetic data).
    """

    def __init__(self, encoder: Encoder, cfg: TrainConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.cfg = cfg

    def forward(
        self, item: torch.Tensor, etype: torch.Tensor, gap: torch.Tensor,
        next_item: torch.Tensor, next_type: torch.Tensor, next_log_gap: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        enc, cfg = self.encoder, self.cfg
        y, _ = enc.hidden_seq(item, etype, gap)  # (T, B, H)
        mask = next_item > 0  # (T, B)
        h = y[mask]  # (N, H)
        z, kl = enc.sample_z(h)  # (N, D), (N,)
        tgt = next_item[mask]  # (N,)
        cur = item[mask]  # the item of event t itself
        repeat_loss = z.new_zeros(())
        if cfg.loss == "full":
            logits = enc.item_logits(z).float()
            item_loss = F.cross_entropy(logits, tgt)
            if cfg.repeat_weight > 0:
                repeat_loss = F.cross_entropy(logits, cur)
        else:
            item_loss = self._sampled_softmax(z, tgt)
            if cfg.repeat_weight > 0:
                repeat_loss = self._sampled_softmax(z, cur)
        type_loss = F.cross_entropy(enc.type_head(z).float(), next_type[mask])
        tl = next_log_gap[mask]
        ok = torch.isfinite(tl)
        pred = enc.time_head(z).squeeze(-1).float()
        time_loss = F.mse_loss(pred[ok], tl[ok]) if bool(ok.any()) else pred.sum() * 0.0
        kl_loss = kl.float().mean()
        loss = (cfg.item_weight * item_loss + cfg.repeat_weight * repeat_loss + cfg.type_weight * type_loss
                + cfg.time_weight * time_loss)
        if enc.cfg.vae:
            loss = loss + cfg.kl_weight * kl_loss
        return loss, {"item": item_loss.detach(), "repeat": repeat_loss.detach(), "type": type_loss.detach(),
                      "time": time_loss.detach(), "kl": kl_loss.detach()}

    def _sampled_softmax(self, z: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Softmax over the true item and K uniform negatives shared by the batch
        (uniform proposal: the logQ correction is a constant and cancels)."""
        enc = self.encoder
        negs = torch.randint(2, enc.cfg.n_items, (self.cfg.num_negatives,), device=z.device)
        q = enc.item_query(z)  # (N, E)
        pos = (q * enc.item_emb(tgt)).sum(-1) + enc.item_bias[tgt]  # (N,)
        neg = q @ enc.item_emb(negs).t() + enc.item_bias[negs]  # (N, K)
        neg = neg.masked_fill(negs.unsqueeze(0) == tgt.unsqueeze(1), float("-inf"))  # accidental hits
        logits = torch.cat([pos.unsqueeze(1), neg], dim=1).float()
        return F.cross_entropy(logits, torch.zeros(len(tgt), dtype=torch.long, device=z.device))


def _to(batch: Batch, device: torch.device) -> list[torch.Tensor]:
    arrs = (batch.item, batch.etype, batch.gap, batch.next_item, batch.next_type, batch.next_log_gap)
    return [torch.from_numpy(a).to(device, non_blocking=True) for a in arrs]


# ---------------------------------------------------------------------------- train


def train(cfg: TrainConfig, source: Any = None) -> dict[str, Any]:
    """Train, checkpoint, evaluate the test split with best.pt; returns metrics.json's dict
    (on rank 0; other ranks return {})."""
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
    out = Path(cfg.out)
    t_start = time.perf_counter()

    split = build_split(cfg, source)
    mcfg = model_config(cfg, split)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
        (out / "vocab.json").write_text(json.dumps(split.spec.to_json()) + "\n")
        log.info("split %s: %s", cfg.split, {k: v for k, v in split.info.items()})

    torch.manual_seed(cfg.seed)  # same initial weights whatever the data loading drew
    encoder = Encoder(mcfg)
    if cfg.item_init_std > 0:
        with torch.no_grad():
            nn.init.normal_(encoder.item_emb.weight, std=cfg.item_init_std)
            encoder.item_emb.weight[0].zero_()  # padding
    encoder.to(device)
    objective: nn.Module = Objective(encoder, cfg)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        objective = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(encoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    steps_per_epoch = len(split.train) // cfg.batch_size // world + 1
    total_steps = max(1, cfg.epochs * steps_per_epoch)

    def lr_factor(s: int) -> float:
        warm = min(1.0, (s + 1) / max(1, cfg.warmup_steps))
        if cfg.lr_schedule == "constant":
            return warm
        return warm * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, s / total_steps))))

    history: list[dict[str, Any]] = []
    best_score, best_epoch, bad_epochs, start_epoch, step = -1.0, -1, 0, 0, 0
    train_seconds, seqs_seen, events_seen = 0.0, 0, 0
    if cfg.resume and (out / "last.pt").exists():
        payload = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
        encoder.load_state_dict(payload["state_dict"])
        opt.load_state_dict(payload["optimizer"])
        r = payload["resume"]
        history, best_score, best_epoch, bad_epochs = r["history"], r["best_score"], r["best_epoch"], r["bad_epochs"]
        start_epoch, step = payload["epoch"] + 1, payload["step"]
        train_seconds, seqs_seen, events_seen = r["train_seconds"], r["seqs_seen"], r["events_seen"]
        torch.set_rng_state(r["torch_rng"])
        log.info("resumed from %s at epoch %d", out / "last.pt", start_epoch)

    valid_baselines = fit_baselines(split.train, split.spec.n_items)
    eval_kw = {"device": device, "k": cfg.eval_k, "num_negatives": cfg.num_eval_negatives,
               "seed": cfg.eval_seed, "batch_size": cfg.eval_batch_size}
    key = f"model.sampled.ndcg@{cfg.eval_k}"
    deadline = time.perf_counter() + cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
    stop = False
    for epoch in range(start_epoch, cfg.epochs):
        encoder.train()
        rng = np.random.default_rng([cfg.seed, epoch])
        batches = list(bucket_batches(split.train, cfg.batch_size, cfg.max_len, rng, rank, world))
        bar = tqdm(batches, desc=f"epoch {epoch}", disable=not cfg.progress or rank != 0, leave=False,
                   dynamic_ncols=True)
        loss_sum = torch.zeros(2, dtype=torch.float64)
        t0 = time.perf_counter()
        for batch in bar:
            tensors = _to(batch, device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                loss, parts = objective(*tensors)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(step)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(encoder.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            step += 1
            lv = float(loss.detach())
            loss_sum += torch.tensor([lv * len(batch.lengths), len(batch.lengths)], dtype=torch.float64)
            seqs_seen += len(batch.lengths) * world
            events_seen += batch.n_targets * world
            bar.set_postfix(loss=f"{lv:.4f}", item=f"{float(parts['item']):.3f}")
            if time.perf_counter() > deadline:
                stop = True
                break
        train_seconds += time.perf_counter() - t0
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(loss_sum)
        train_loss = float(loss_sum[0] / max(loss_sum[1], 1.0))

        flag = torch.zeros(1)
        if rank == 0:
            m = evaluate(encoder, split, "valid", baselines=valid_baselines, **eval_kw)
            fm = flat(m)
            rec = {"epoch": epoch, "step": step, "train_loss": train_loss,
                   "train_seconds": train_seconds, **{k: fm[k] for k in sorted(fm) if not k.startswith("compression")}}
            history.append(rec)
            score = fm[key]
            log.info("epoch %d loss %.4f valid sampled HR@%d %.4f NDCG@%d %.4f (markov %.4f) full HR %.4f",
                     epoch, train_loss, cfg.eval_k, fm[f"model.sampled.hr@{cfg.eval_k}"], cfg.eval_k, score,
                     fm[f"markov.sampled.hr@{cfg.eval_k}"], fm[f"model.full.hr@{cfg.eval_k}"])
            if score > best_score:
                best_score, best_epoch, bad_epochs = score, epoch, 0
                save_checkpoint(out / "best.pt", encoder, split.spec, cfg.to_dict(), m, epoch=epoch, step=step)
            else:
                bad_epochs += 1
            resume_state = {"history": history, "best_score": best_score, "best_epoch": best_epoch,
                            "bad_epochs": bad_epochs, "train_seconds": train_seconds, "seqs_seen": seqs_seen,
                            "events_seen": events_seen, "torch_rng": torch.get_rng_state()}
            save_checkpoint(out / "last.pt", encoder, split.spec, cfg.to_dict(), m, epoch=epoch, step=step,
                            optimizer=opt.state_dict(), resume=resume_state)
            if stop or bad_epochs >= cfg.patience:
                flag[0] = 1.0
        if world > 1:
            import torch.distributed as dist

            dist.broadcast(flag, 0)
        if flag[0] > 0:
            break

    result: dict[str, Any] = {}
    if rank == 0:
        best, _, payload = load_checkpoint(out / "best.pt")
        best.to(device)
        test = evaluate(best, split, "test", baselines=fit_baselines(split.train, split.spec.n_items), **eval_kw)
        n_params = sum(p.numel() for p in best.parameters())
        result = {
            "test": test,
            "margins": test.get("margins", {}),
            "compression": test["compression"],
            "best_epoch": payload.get("epoch", best_epoch),
            "valid_at_best": payload.get("metrics", {}),
            "epochs_run": len(history),
            "training_seconds": train_seconds,
            "wall_seconds": time.perf_counter() - t_start,
            "throughput": {"sequences_per_s": seqs_seen / max(train_seconds, 1e-9),
                           "events_per_s": events_seen / max(train_seconds, 1e-9)},
            "world_size": world,
            "device": str(device),
            "amp": str(amp_dtype).replace("torch.", "") if use_amp else None,
            "model": {"config": mcfg.to_dict(), "parameters": n_params, "bytes_f32": n_params * 4},
            "split": split.info,
            "history": history,
            "torch": torch.__version__,
        }
        (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
        from clickvec.training.report import write_report

        write_report(out, result, cfg)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return result
