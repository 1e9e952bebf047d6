"""The surprise's item term without the full-catalogue softmax (`clickvec export --surprise`).

The exact step graph scores every event against every item: -log p(item_t | z) needs
log Z = logsumexp_i(q . e_i + b_i) over all N items, an (N, Ei) product and N exps per
user-step, which dominates the step once N is a few thousand (benchmarks/README.md,
"Surprise and the catalogue"). The approximate mode keeps the observed item's logit
exact and estimates only log Z:

  head   the K items with the largest item bias, scored exactly. A trained item bias is
         the item's log popularity (the softmax learns it), so these carry most of Z for
         most users; the bias is in every bundle, hash or vocabulary, with no counts.
  tail   the other items in C k-means clusters of their embeddings (faiss). With weights
         w_i = exp(b_i), cluster c contributes
             log W_c + q . mu_c + min(1/2 q' S_c q, |q| R_c)
         W_c the summed weights, mu_c and S_c the weighted mean and covariance (S_c kept
         as its top r eigenpairs plus the mean variance of the other directions; r = 0:
         that mean variance alone), R_c the largest distance of a member from mu_c. The
         first two terms are Jensen's lower bound of the cluster's log-sum-exp, the third
         its second-order (Gaussian) correction, capped by the bound that no member's
         logit exceeds q . mu_c + |q| R_c: the estimate stays within those two bounds.

Cost per user-step: (K + C (1 + r)) Ei multiply-adds and K + C exps instead of N Ei and N.
Only standard opset-17 ops; inputs and outputs are those of the exact graph, so a worker
cannot tell the two apart except by the manifest's `surprise` entry.

The graph is the exact one with its item log-softmax replaced (`approximate_graph`), so
everything else (LSTM, z heads, the event-type term) is the same nodes, byte for byte.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from clickvec.errors import ClickvecError

MODES = ("auto", "exact", "approx")
# `auto`: exact up to this many items, approx above. Every bundle this project has made
# stays exact (synthetic catalogues of 1-5k items; the real-data runs, Amazon Beauty 12,070
# and Sports 18,286 items), so re-exporting one changes nothing an alert threshold was set
# on; above 50k the exact item term costs over 20x the approximation's per user-step (8.6x
# at 20k, 77x at 200k: benchmarks/README.md, "Surprise and the catalogue").
AUTO_EXACT_MAX_ITEMS = 50_000
# Defaults measured on a trained catalogue grown to 200k items (benchmarks/README.md,
# "Surprise and the catalogue"): 2,048 clusters bring the error's p99 from 2.5 nats (512
# clusters) to 0.11; rank 0 (isotropic spread only) beats ranks 1-4 there, because a
# cluster that merges two groups of items has a spread the top eigenvectors overstate.
DEFAULT_HEAD = 512
DEFAULT_CLUSTERS = 2048
DEFAULT_RANK = 0

# The nodes of export/graph.py's `_surprise` that compute log p(item_t | z_prev) from
# `query`, by output name; `approximate_graph` replaces them, and the output they end in.
_EXACT_ITEM_NODES = ("item_emb_T", "logits_mm", "logits", "logp", "item_idx", "logp_item", "logp_item_sq")
_QUERY, _ITEM_LOGP = "query", "logp_item_sq"


class SurpriseModeError(ClickvecError):
    """A `--surprise` value that is not one of the modes. Action: pass exact, approx,
    approx:head=K,clusters=C,rank=R or auto."""


@dataclass(frozen=True)
class SurpriseMode:
    kind: str  # "exact" | "approx" (after `resolve`); "auto" before
    head: int = DEFAULT_HEAD
    clusters: int = DEFAULT_CLUSTERS
    rank: int = DEFAULT_RANK

    def label(self) -> str:
        if self.kind != "approx":
            return self.kind
        return f"approx:head={self.head},clusters={self.clusters},rank={self.rank}"


def parse_mode(text: str) -> SurpriseMode:
    """`exact`, `auto`, `approx` or `approx:head=K,clusters=C,rank=R` (any subset)."""
    kind, _, rest = text.strip().partition(":")
    if kind not in MODES or (rest and kind != "approx"):
        raise SurpriseModeError(f"--surprise {text!r}: expected one of exact, approx, auto "
                                "(approx takes :head=K,clusters=C,rank=R)")
    params: dict[str, int] = {}
    for part in filter(None, rest.split(",")):
        key, _, val = part.partition("=")
        if key not in ("head", "clusters", "rank") or not val.isdigit():
            raise SurpriseModeError(f"--surprise {text!r}: {part!r} is not head=K, clusters=C or rank=R "
                                    "with a whole number")
        params[key] = int(val)
    mode = SurpriseMode(kind, **params)
    if kind == "approx" and (mode.head < 1 or mode.clusters < 1):
        raise SurpriseModeError(f"--surprise {text!r}: head and clusters must be at least 1")
    return mode


def resolve(mode: SurpriseMode, n_items: int) -> SurpriseMode:
    """`auto` -> exact or approx by catalogue size; approx with head + clusters covering
    the whole catalogue is exact (there is nothing to estimate)."""
    if mode.kind == "auto":
        mode = SurpriseMode("exact") if n_items <= AUTO_EXACT_MAX_ITEMS else SurpriseMode("approx")
    if mode.kind == "approx" and mode.head + mode.clusters >= n_items:
        return SurpriseMode("exact")
    return mode


def tail_tables(emb: np.ndarray, bias: np.ndarray, mode: SurpriseMode, seed: int = 0) -> dict[str, np.ndarray]:
    """The approximation's constants from the item embeddings (N, Ei) and biases (N,)."""
    try:
        import faiss  # the `ann` extra (also `clickvec recommend`'s index)
    except ImportError as e:
        raise SurpriseModeError(f"--surprise {mode.label()} clusters the catalogue with faiss, which is not "
                                "installed: pip install 'clickvec[ann]' (or export with --surprise exact)") from e

    emb = np.ascontiguousarray(emb, np.float32)
    bias = np.asarray(bias, np.float64)
    n, dim = emb.shape
    order = np.argsort(-bias, kind="stable")
    head, tail = order[: mode.head], order[mode.head :]
    km = faiss.Kmeans(dim, mode.clusters, niter=20, seed=seed + 1, verbose=False, max_points_per_centroid=64)
    km.train(emb[tail])
    _, assign = km.index.search(emb[tail], 1)
    assign = assign[:, 0]
    rank = min(mode.rank, dim)
    mu, logw, lam, vec, radius, rest = [], [], [], [], [], []
    for c in range(mode.clusters):
        members = tail[assign == c]
        if len(members) == 0:
            continue
        e, b = emb[members].astype(np.float64), bias[members]
        top = b.max()
        w = np.exp(b - top)
        p = w / w.sum()
        m = p @ e
        d = e - m
        cov = (d * p[:, None]).T @ d
        evals, evecs = np.linalg.eigh(cov)  # ascending
        mu.append(m)
        logw.append(top + np.log(w.sum()))
        # the top `rank` directions exactly, the others as their mean variance (isotropic):
        # 1/2 q'Sq ~= sum_k 1/2 (l_k - s) (q.v_k)^2 + 1/2 s |q|^2
        evals = np.clip(evals[::-1], 0.0, None)
        s = evals[rank:].mean() if rank < dim else 0.0
        lam.append(0.5 * (evals[:rank] - s))
        rest.append(0.5 * s)
        vec.append(evecs[:, ::-1][:, :rank])
        radius.append(np.sqrt((d * d).sum(1).max()))
    k = len(mu)
    f32 = np.float32
    out = {
        "sa_head_embT": np.ascontiguousarray(emb[head].T, f32),  # (Ei, K)
        "sa_head_bias": bias[head].astype(f32),  # (K,)
        "sa_mu_T": np.ascontiguousarray(np.array(mu).T, f32),  # (Ei, C)
        "sa_logw": np.array(logw, f32),  # (C,)
        "sa_radius": np.array(radius, f32),  # (C,)
        "sa_half_rest": np.array(rest, f32),  # (C,)
        "sa_axis2": np.array([2], np.int64),
        "sa_first": np.array(0, np.int64),
    }
    if rank:  # the top directions' tables; rank 0 uses the isotropic term alone
        out.update(sa_v=np.ascontiguousarray(np.concatenate(vec, axis=1), f32),  # (Ei, C * r), cluster-major
                   sa_half_lam=np.array(lam, f32).reshape(k, rank),  # (C, r)
                   sa_cr=np.array([k, rank], np.int64), sa_axis3=np.array([3], np.int64))
    return out


def _node(op: str, inputs: list[str], output: str, **attrs: Any) -> Any:
    from onnx import helper

    return helper.make_node(op, inputs, [output], name=output, **attrs)


def _tail_nodes(rank: int) -> list[Any]:
    """The clusters' log-sums, as `sa_tail` (T, B, C): Jensen term + capped second-order term."""
    q = _QUERY
    jensen = [_node("MatMul", [q, "sa_mu_T"], "sa_mu_mm"), _node("Add", ["sa_mu_mm", "sa_logw"], "sa_jensen")]
    norm = [
        _node("ReduceL2", [q], "sa_qnorm", axes=[2], keepdims=1),  # (T, B, 1)
        _node("Mul", ["sa_qnorm", "sa_qnorm"], "sa_qnorm_sq"),
        _node("Mul", ["sa_qnorm_sq", "sa_half_rest"], "sa_iso"),  # (T, B, C)
        _node("Mul", ["sa_qnorm", "sa_radius"], "sa_cap"),
    ]
    if rank == 0:
        return [*jensen, *norm, _node("Min", ["sa_iso", "sa_cap"], "sa_corr"),
                _node("Add", ["sa_jensen", "sa_corr"], "sa_tail")]
    return [
        *jensen,
        *norm,
        _node("MatMul", [q, "sa_v"], "sa_proj"),  # (T, B, C r)
        # (T, B, C r) -> (T, B, C, r); the shape built from sa_proj's own (T, B), since the
        # checker rejects Reshape's copy-this-dim zeros here
        _node("Shape", ["sa_proj"], "sa_tb", start=0, end=2),
        _node("Concat", ["sa_tb", "sa_cr"], "sa_shape", axis=0),
        _node("Reshape", ["sa_proj", "sa_shape"], "sa_proj4"),
        _node("Mul", ["sa_proj4", "sa_proj4"], "sa_proj_sq"),
        _node("Mul", ["sa_proj_sq", "sa_half_lam"], "sa_quad_terms"),
        _node("ReduceSum", ["sa_quad_terms", "sa_axis3"], "sa_quad_top", keepdims=0),  # (T, B, C)
        _node("Add", ["sa_quad_top", "sa_iso"], "sa_quad"),
        _node("Min", ["sa_quad", "sa_cap"], "sa_corr"),
        _node("Add", ["sa_jensen", "sa_corr"], "sa_tail"),
    ]


def _approx_nodes(item_input: str, rank: int) -> list[Any]:
    """log p(item_t) ~= (q . e_item + b_item) - log Z_hat, as `_ITEM_LOGP` (T, B)."""
    q = _QUERY
    return [
        # the observed item's own logit, exact
        _node("Gather", ["item_emb", item_input], "sa_e_t"),  # (T, B, Ei)
        _node("Mul", [q, "sa_e_t"], "sa_qe"),
        _node("ReduceSum", ["sa_qe", "sa_axis2"], "sa_qe_sum", keepdims=0),
        _node("Gather", ["item_bias", item_input], "sa_b_t"),
        _node("Add", ["sa_qe_sum", "sa_b_t"], "sa_logit_t"),  # (T, B)
        # head: exact logits
        _node("MatMul", [q, "sa_head_embT"], "sa_head_mm"),
        _node("Add", ["sa_head_mm", "sa_head_bias"], "sa_head"),  # (T, B, K)
        *_tail_nodes(rank),
        _node("Concat", ["sa_head", "sa_tail"], "sa_parts", axis=2),  # (T, B, K + C)
        # log Z = x_0 - log_softmax(x)_0: ORT's LogSoftmax is vectorised, its ReduceLogSumExp
        # is not (13.7 vs 24.9 us CPU a user-step at 20k items, B = 64, same figures)
        _node("LogSoftmax", ["sa_parts"], "sa_parts_lsm", axis=2),
        _node("Gather", ["sa_parts", "sa_first"], "sa_part0", axis=2),  # (T, B)
        _node("Gather", ["sa_parts_lsm", "sa_first"], "sa_part0_lsm", axis=2),
        _node("Sub", ["sa_part0", "sa_part0_lsm"], "sa_logz"),
        _node("Sub", ["sa_logit_t", "sa_logz"], _ITEM_LOGP),
    ]


def approximate_graph(proto: Any, emb: np.ndarray, bias: np.ndarray, mode: SurpriseMode, seed: int = 0) -> Any:
    """A copy of the exact step graph `proto` whose item log-probability is the approximate
    one. Raises ValueError when `proto` lacks the exact graph's item softmax nodes."""
    import onnx
    from onnx import numpy_helper

    from clickvec.bundle.format import IN_ITEM

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    nodes = list(out.graph.node)
    by_output = {n.output[0]: i for i, n in enumerate(nodes)}
    missing = [name for name in _EXACT_ITEM_NODES if name not in by_output]
    if missing:
        raise ValueError(f"step graph has no {missing}: export/graph.py's item softmax changed")
    drop = {by_output[name] for name in _EXACT_ITEM_NODES}
    at = min(drop)
    kept = [n for i, n in enumerate(nodes) if i not in drop]
    tables = tail_tables(emb, bias, mode, seed)
    rank = tables["sa_half_lam"].shape[1] if "sa_half_lam" in tables else 0
    new = kept[:at] + _approx_nodes(IN_ITEM, rank) + kept[at:]
    del out.graph.node[:]
    out.graph.node.extend(new)
    for name, value in tables.items():
        out.graph.initializer.append(numpy_helper.from_array(value, name))
    onnx.checker.check_model(out, full_check=True)
    return out


def manifest_entry(mode: SurpriseMode, n_items: int, figures: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the bundle's manifest says about its surprise (`surprise`)."""
    entry: dict[str, Any] = {"mode": mode.kind, "label": mode.label(), "n_items": n_items}
    if mode.kind == "approx":
        entry.update({k: v for k, v in asdict(mode).items() if k != "kind"})
        entry["how"] = ("item term: exact logit of the observed item minus an estimated log Z: the `head` "
                        "items of largest bias exact, the rest as k-means clusters (log-sum of weights + "
                        "q.mean + capped second-order term); event-type term exact")
        if figures:
            entry["error_vs_exact"] = figures
    else:
        entry["how"] = "exact log-softmax over the whole catalogue"
    return entry


def error_figures(exact: np.ndarray, approx: np.ndarray) -> dict[str, Any]:
    """How far approximate surprises are from the exact ones (flat arrays of the same events)."""
    exact = np.asarray(exact, np.float64)
    approx = np.asarray(approx, np.float64)
    err = np.abs(approx - exact)
    rel = err / np.maximum(np.abs(exact), 1e-6)

    def stats(x: np.ndarray) -> dict[str, float]:
        return {"mean": float(x.mean()), "p99": float(np.quantile(x, 0.99)), "max": float(x.max())}

    return {"events": int(exact.size), "abs": stats(err), "rel": stats(rel),
            "signed_mean": float((approx - exact).mean()), "spearman": spearman(exact, approx)}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x), np.float64)
        r[order] = np.arange(len(x))
        uniq, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, weights=r)
        return (sums / counts)[inv]

    ra, rb = ranks(np.asarray(a)), ranks(np.asarray(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def approximate_model_graph(proto: Any, model: Any, mode: SurpriseMode, seed: int = 0) -> Any:
    """`approximate_graph` with the item tables of the `Encoder` `model`."""
    sd = model.state_dict()
    return approximate_graph(proto, sd["item_emb.weight"].float().numpy(), sd["item_bias"].float().numpy(),
                             mode, seed)


def approx_figures(model: Any, exact: bytes, approx: bytes, real: list[np.ndarray], seed: int = 0,
                   batch: int = 4) -> dict[str, Any]:
    """The approximate graph against the exact one on random and `real` sequences: its
    surprise error (`error_figures`) and that its states and vectors are the exact graph's.
    Small batches: the exact graph holds a (T, B, N) log-softmax."""
    from clickvec.bundle.runtime import RuntimeConfig, StepSession
    from clickvec.export.parity import pack, random_sequences

    cfg = model.cfg
    rng = np.random.default_rng(seed + 2)
    seqs = random_sequences(rng, cfg.n_items, cfg.n_event_types, cfg.n_gap_buckets, 32, 40) + list(real[:256])
    sessions = [StepSession(b, RuntimeConfig(providers="cpu", warmup=False)) for b in (exact, approx)]
    s_ex, s_ap, state_diff = [], [], 0.0
    for i in range(0, len(seqs), batch):
        chunk = seqs[i : i + batch]
        items, types, gaps, lengths = pack(chunk)
        zero = np.zeros((cfg.layers, len(chunk), cfg.hidden), np.float32)
        ex, ap = (s.run(items, types, gaps, lengths, zero, zero) for s in sessions)
        state_diff = max(state_diff, *(float(np.max(np.abs(a - b))) for a, b in zip(ex[:4], ap[:4], strict=True)))
        for b, s in enumerate(chunk):
            s_ex.append(ex[4][: len(s), b])
            s_ap.append(ap[4][: len(s), b])
    fig = error_figures(np.concatenate(s_ex), np.concatenate(s_ap))
    fig["state_and_vector_max_abs_diff"] = state_diff
    fig["sequences"] = {"random": 32, "real": min(len(real), 256)}
    return fig
