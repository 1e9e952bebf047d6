"""The training objectives around the Encoder, in one module so DDP wraps one forward that
uses every parameter. Every prediction comes from z after event t (the published vector)
and targets event t + 1: causal by the LSTM, no masking tricks."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clickvec.training.config import TrainConfig
from clickvec.training.model import Encoder


def item_log_q(train: list[np.ndarray], n_items: int) -> torch.Tensor:
    """log of the sampled-softmax proposal: item frequency in the training split, smoothed
    by one so that every catalogue item can be drawn (padding and OOV never are)."""
    counts = np.ones(n_items, dtype=np.float64)
    for s in train:
        np.add.at(counts, s[:, 0].astype(np.int64), 1.0)
    counts[:2] = 0.0
    with np.errstate(divide="ignore"):  # log 0 = -inf: padding and OOV are never drawn
        return torch.from_numpy(np.log(counts / counts.sum())).float()


class Objective(nn.Module):
    """Encoder + losses: next item (full softmax, or sampled softmax from the item-frequency
    proposal with the logQ correction), next event type, log gap, VAE KL, and two optional
    auxiliaries from the same z: `repeat_weight` (the current item under the next-item
    scores, for data whose next event often repeats it) and `bag_weight` (the last
    `eval_k` input items under the bag-of-items head)."""

    def __init__(self, encoder: Encoder, cfg: TrainConfig, log_q: torch.Tensor | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.cfg = cfg
        if log_q is None:  # uniform over the catalogue
            n = encoder.cfg.n_items
            log_q = torch.full((n,), -float(np.log(max(n - 2, 1))))
            log_q[:2] = -float("inf")
        self.register_buffer("log_q", log_q, persistent=False)

    def forward(
        self, item: torch.Tensor, etype: torch.Tensor, gap: torch.Tensor,
        next_item: torch.Tensor, next_type: torch.Tensor, next_log_gap: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        enc, cfg = self.encoder, self.cfg
        y, _ = enc.hidden_seq(item, etype, gap)  # (T, B, H)
        mask = next_item > 0  # (T, B)
        z, kl = enc.sample_z(y[mask])  # (N, D), (N,)
        parts = {"item": self._item_ce(z, next_item[mask])}
        parts["repeat"] = self._item_ce(z, item[mask]) if cfg.repeat_weight > 0 else z.new_zeros(())
        parts["type"] = (F.cross_entropy(enc.type_head(z).float(), next_type[mask])
                         if cfg.type_weight > 0 else z.new_zeros(()))
        parts["time"] = self._time_loss(z, next_log_gap[mask]) if cfg.time_weight > 0 else z.new_zeros(())
        parts["kl"] = kl.float().mean()
        parts["bag"] = self._bag_loss(z, item, mask) if cfg.bag_weight > 0 else z.new_zeros(())
        loss = (cfg.item_weight * parts["item"] + cfg.repeat_weight * parts["repeat"]
                + cfg.type_weight * parts["type"] + cfg.time_weight * parts["time"] + cfg.bag_weight * parts["bag"])
        if enc.cfg.vae:
            loss = loss + cfg.kl_weight * parts["kl"]
        return loss, {k: v.detach() for k, v in parts.items()}

    def _item_ce(self, z: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss == "full":
            return F.cross_entropy(self.encoder.item_logits(z).float(), tgt)
        return self._sampled_softmax(z, tgt)

    def _time_loss(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ok = torch.isfinite(target)
        pred = self.encoder.time_head(z).squeeze(-1).float()
        return F.mse_loss(pred[ok], target[ok]) if bool(ok.any()) else pred.sum() * 0.0

    def _sampled_softmax(self, z: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Softmax over the true item and K negatives shared by the batch, drawn from the
        proposal q; every logit is corrected by -log q so the estimate targets the full
        softmax (Bengio & Senecal; the logQ correction of Yi et al. 2019)."""
        enc = self.encoder
        negs = torch.multinomial(self.log_q.exp(), self.cfg.num_negatives, replacement=True)
        q = enc.item_query(z)  # (N, E)
        pos = (q * enc.item_emb(tgt)).sum(-1) + enc.item_bias[tgt] - self.log_q[tgt]  # (N,)
        neg = q @ enc.item_emb(negs).t() + enc.item_bias[negs] - self.log_q[negs]  # (N, K)
        neg = neg.masked_fill(negs.unsqueeze(0) == tgt.unsqueeze(1), float("-inf"))  # accidental hits
        logits = torch.cat([pos.unsqueeze(1), neg], dim=1).float()
        return F.cross_entropy(logits, torch.zeros(len(tgt), dtype=torch.long, device=z.device))

    def _bag_loss(self, z: torch.Tensor, item: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean CE, under the bag head's softmax, of each of the last k input items (the
        current one included) at every step: the recent history decoded from z."""
        k = self.cfg.eval_k
        logp = F.log_softmax(self.encoder.bag_logits(z).float(), dim=-1)  # (N, n_items)
        shifted = torch.stack([F.pad(item, (0, 0, j, 0))[: item.shape[0]] for j in range(k)], -1)  # (T, B, k)
        recent = shifted[mask]  # (N, k), 0 where the history is shorter
        ok = recent > 0
        nll = -logp.gather(1, recent) * ok
        return nll.sum() / ok.sum().clamp(min=1)
