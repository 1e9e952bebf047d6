"""Start the encoder where a first-order Markov model already is (`item_init="transitions"`).

The state a user carries is the LSTM's (h, c) and every score comes from z = z_head(h), so
an input -> z skip (FPMC's item-to-item term) cannot be added without carrying the last
input too. The same term fits inside the LSTM instead: this module initialises the weights
so that, before any step of training,

    score(j | current item i) = e_i . e_j + b_j  ~  PMI(i, j) + log count(j)  ~  log P(j | i) + const

- item embeddings e: the top eigenvectors (scaled by the root of their eigenvalue) of the
  training split's positive PMI matrix of item pairs up to 3 events apart, symmetrised
  (count(i -> j) + count(j -> i); repeats on the diagonal); a tiny random part keeps items
  without pairs apart;
- item bias b: log(1 + training count);
- "copy" LSTM units: the first min(hidden, item_dim) units get input gate and output gate
  open, forget gate shut, no recurrent weights, and a candidate that reads one item-
  embedding coordinate each, so h_k ~ s * e_k after every event;
- z_head reads those units back (1 / s), item_proj maps z's coordinates onto the
  embedding's (the eigen-coordinates come sorted, so a z smaller than the embedding keeps
  the strongest ones); the other units start with small weights into z.

Training then moves everything; nothing in the architecture, the exported step graph or the
state changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from clickvec.training.baselines import Popularity
from clickvec.training.model import Encoder

GATE_OPEN = 4.0  # sigmoid(4) = 0.982: input and output gates open, forget gate (-4) shut
COPY_GAIN = 0.25  # candidate = tanh(gain * e / std(e)): inside tanh's near-linear range
# e_i . e_j reproduces PMI at the scale of log counts; sharper scores rank the transitions
# above the popular items (measured on tests/data/beauty_slice.txt: the factor's own HR@10
# full, seen excluded, valid, 0.042 at 1x, 0.052 at 10x, Markov 0.054).
SHARPEN = 10.0
# Pairs up to 3 events apart, not only consecutive ones: the factor's HR@10 / NDCG@10 (as
# above) 0.049 / 0.026 from consecutive pairs, 0.061 / 0.034 within 3 (Markov 0.054 / 0.033).
WINDOW = 3
OTHER_SCALE = 0.1  # the non-copy units' weights into z, relative to PyTorch's default init


def transition_counts(train: Sequence[np.ndarray], n_items: int, window: int = WINDOW) -> torch.Tensor:
    """Sparse (n_items, n_items) counts of item pairs up to `window` events apart, both directions."""
    pairs = [np.stack([s[:-lag, 0], s[lag:, 0]], axis=1).astype(np.int64)
             for s in train for lag in range(1, window + 1) if len(s) > lag]
    p = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    idx = torch.from_numpy(np.concatenate([p, p[:, ::-1]]).T.copy())
    vals = torch.ones(idx.shape[1], dtype=torch.float64)
    return torch.sparse_coo_tensor(idx, vals, (n_items, n_items), check_invariants=True).coalesce()


def ppmi(counts: torch.Tensor) -> torch.Tensor:
    """Positive pointwise mutual information of a symmetric sparse count matrix (sparse)."""
    idx, v = counts.indices(), counts.values()
    rows = torch.zeros(counts.shape[0], dtype=torch.float64).index_add_(0, idx[0], v)
    total = float(v.sum())
    pmi = torch.log(v * total / (rows[idx[0]] * rows[idx[1]]))
    keep = pmi > 0
    return torch.sparse_coo_tensor(idx[:, keep], pmi[keep], counts.shape, check_invariants=True).coalesce()


def psd_factor(m: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """(n, dim) X with X X^T ~ the positive part of symmetric m, columns by falling eigenvalue."""
    n = m.shape[0]
    q = min(dim + 16, n - 1)  # a few more than kept: the randomised SVD's last ones are rough
    torch.manual_seed(seed)
    u, s, v = torch.svd_lowrank(m.to(torch.float32), q=q, niter=4)
    # A symmetric matrix's positive eigenvalues have u == v; negative ones u == -v: averaging
    # keeps the former and cancels the latter.
    x = 0.5 * (u + v) * s.clamp(min=0).sqrt()
    order = torch.argsort((x * x).sum(0), descending=True)[:dim]
    out = torch.zeros(n, dim)
    out[:, : len(order)] = x[:, order]
    return out


@torch.no_grad()
def init_from_transitions(enc: Encoder, train: Sequence[np.ndarray], seed: int = 0) -> dict[str, float]:
    """Set the encoder's weights as the module docstring says; returns a few figures for the log."""
    cfg = enc.cfg
    n, d, hid, zd = cfg.n_items, cfg.item_dim, cfg.hidden, cfg.z_dim
    emb = psd_factor(ppmi(transition_counts(train, n)), d, seed) * SHARPEN**0.5
    scale = float(emb[2:].std()) or 1.0
    emb[2:] += 0.05 * scale * torch.randn(n - 2, d)
    emb[0] = 0.0
    enc.item_emb.weight.copy_(emb)
    bias = torch.from_numpy(np.log1p(Popularity(train, n).counts)).float()
    bias[:2] = 0.0
    enc.item_bias.copy_(bias - bias[2:].mean())

    k = min(hid, d, zd)
    gain = COPY_GAIN / scale
    units = torch.arange(k)
    open_ = float(torch.sigmoid(torch.tensor(GATE_OPEN)))
    for layer in range(cfg.layers):
        # Layer 0 reads embedding coordinate k; a layer above reads the copy unit k below,
        # with the gain that undoes the two gates (to first order).
        _copy_units(enc.lstm, layer, hid, units, gain if layer == 0 else 1.0 / (open_ * open_))
    # h_k = o * tanh(i * tanh(gain * e_k)) ~ gain * open^2 * e_k: z_head undoes it.
    enc.z_head.weight.mul_(OTHER_SCALE)
    enc.z_head.weight[:, :k] = 0.0
    enc.z_head.weight[units, units] = 1.0 / (gain * open_ * open_)
    enc.z_head.bias.zero_()
    enc.item_proj.weight.zero_()
    enc.item_proj.weight[units, units] = 1.0
    enc.item_proj.bias.zero_()
    return {"copy_units": k, "embedding_std": scale}


def _copy_units(lstm: torch.nn.LSTM, layer: int, hid: int, units: torch.Tensor, gain: float) -> None:
    """Units `units` of `layer`: input and output gates open, forget gate shut, no recurrent
    weights, candidate = tanh(gain * input unit k)."""
    w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}")
    b_ih, b_hh = getattr(lstm, f"bias_ih_l{layer}"), getattr(lstm, f"bias_hh_l{layer}")
    for gate, bias in enumerate((GATE_OPEN, -GATE_OPEN, 0.0, GATE_OPEN)):  # PyTorch's order: i, f, g, o
        rows = gate * hid + units
        w_ih[rows] = 0.0
        w_hh[rows] = 0.0
        b_hh[rows] = 0.0
        b_ih[rows] = bias
    w_ih[2 * hid + units, units] = gain
