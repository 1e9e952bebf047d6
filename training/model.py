"""The clickvec behaviour encoder. Imports only torch.

event (item, event type, time-gap bucket) -> embeddings -> LSTM -> z (the published
vector) -> next-item scores (projection of z . item embeddings), next event type,
log time to next event. Every prediction is made from z, so z carries what matters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Architecture:
    """The model's shape and regularisation: the training config takes these fields from here."""

    item_dim: int = 64
    type_dim: int = 8
    gap_dim: int = 8
    hidden: int = 128
    layers: int = 1
    z_dim: int = 32
    vae: bool = False  # VAE head: z ~ N(mu, sigma); the published vector is mu
    dropout: float = 0.0  # on the LSTM output before z, and between LSTM layers (training only)
    input_dropout: float = 0.0  # on the event embeddings entering the LSTM (training only)
    bag_head: bool = False  # a head decoding the user's recent items from z (compression view)


@dataclass(frozen=True)
class Vocabulary:
    n_items: int  # item index space, padding (0) and OOV (1) included
    n_event_types: int
    n_gap_buckets: int


@dataclass(frozen=True)
class ModelConfig(Architecture, Vocabulary):
    """Vocabulary sizes first (positional), then the architecture fields."""

    def to_dict(self) -> dict:
        return asdict(self)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items, cfg.item_dim, padding_idx=0)
        self.type_emb = nn.Embedding(cfg.n_event_types, cfg.type_dim, padding_idx=0)
        self.gap_emb = nn.Embedding(cfg.n_gap_buckets, cfg.gap_dim, padding_idx=0)
        in_dim = cfg.item_dim + cfg.type_dim + cfg.gap_dim
        self.lstm = nn.LSTM(in_dim, cfg.hidden, num_layers=cfg.layers, batch_first=False,
                            dropout=cfg.dropout if cfg.layers > 1 else 0.0)
        # Dropout has no weights: the exported (eval-mode) graph is the same with or without it.
        self.input_drop = nn.Dropout(cfg.input_dropout)
        self.hidden_drop = nn.Dropout(cfg.dropout)
        self.z_head = nn.Linear(cfg.hidden, cfg.z_dim)  # z (or mu for the VAE head)
        self.logvar_head = nn.Linear(cfg.hidden, cfg.z_dim) if cfg.vae else None
        self.item_proj = nn.Linear(cfg.z_dim, cfg.item_dim)  # z -> item-embedding space
        self.item_bias = nn.Parameter(torch.zeros(cfg.n_items))
        self.bag_proj = nn.Linear(cfg.z_dim, cfg.item_dim) if cfg.bag_head else None
        self.type_head = nn.Linear(cfg.z_dim, cfg.n_event_types)
        self.time_head = nn.Linear(cfg.z_dim, 1)  # log1p(seconds to next event)
        nn.init.normal_(self.item_emb.weight, std=0.05)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def zero_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.cfg.layers, batch, self.cfg.hidden)
        w = self.item_emb.weight
        return torch.zeros(shape, dtype=w.dtype, device=w.device), torch.zeros(shape, dtype=w.dtype, device=w.device)

    def inputs(self, item: torch.Tensor, etype: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
        # (T, B) each -> (T, B, E)
        x = torch.cat([self.item_emb(item), self.type_emb(etype), self.gap_emb(gap)], dim=-1)
        return self.input_drop(x)

    def hidden_seq(
        self,
        item: torch.Tensor,
        etype: torch.Tensor,
        gap: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Top-layer hidden state after each event (T, B, H) and the final (h, c)."""
        x = self.inputs(item, etype, gap)
        if state is None:
            state = self.zero_state(item.shape[1])
        y, (h, c) = self.lstm(x, state)
        return self.hidden_drop(y), (h, c)

    def z(self, hidden: torch.Tensor) -> torch.Tensor:
        """The published vector from a top-layer hidden state (..., H) -> (..., D)."""
        return self.z_head(hidden)

    def sample_z(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-time z (reparameterised for the VAE head) and the KL term (per row)."""
        mu = self.z_head(hidden)
        if self.logvar_head is None or not self.training:
            return mu, torch.zeros(mu.shape[:-1], device=mu.device, dtype=mu.dtype)
        logvar = self.logvar_head(hidden).clamp(-8.0, 8.0)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)
        return z, kl

    def item_logits(self, z: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., n_items) next-item scores."""
        return self.item_proj(z) @ self.item_emb.weight.t() + self.item_bias

    def bag_logits(self, z: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., n_items) scores of the items among the user's recent events."""
        if self.bag_proj is None:
            raise ValueError("this model has no bag-of-items head (ModelConfig.bag_head)")
        return self.bag_proj(z) @ self.item_emb.weight.t()

    def item_query(self, z: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., item_dim): dot it with item embeddings (+ bias) to rank items."""
        return self.item_proj(z)

    @torch.no_grad()
    def step(
        self,
        item: torch.Tensor,
        etype: torch.Tensor,
        gap: torch.Tensor,
        h0: torch.Tensor,
        c0: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reference semantics of the exported step graph for equal-length batches.

        (T, B) inputs, (L, B, H) state -> h, c, z after each event (T, B, D),
        surprise (T, B) = -log p(item_t | z_{t-1}) - log p(event_type_t | z_{t-1}), the
        whole observed event scored from the vector before it (item logits and the type
        head, each with its own log-softmax).
        """
        y, (h, c) = self.hidden_seq(item, etype, gap, (h0, c0))
        z_seq = self.z(y)
        z_prev = torch.cat([self.z(h0[-1]).unsqueeze(0), z_seq[:-1]], dim=0)
        logp = F.log_softmax(self.item_logits(z_prev), dim=-1)
        logp_type = F.log_softmax(self.type_head(z_prev), dim=-1)
        surprise = -(logp.gather(-1, item.unsqueeze(-1)).squeeze(-1)
                     + logp_type.gather(-1, etype.unsqueeze(-1)).squeeze(-1))
        return h, c, z_seq, surprise
