"""The generator behind `clickvec.devtools.synth` (what it plants is described there):
all users walked in lock-step with numpy, one vectorised step per visit index."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from clickvec.devtools.synth import SynthConfig

# Walk probabilities (per visit after the first of a session).
P_NEXT_ITEM = 0.15  # follow one of the last item's "next" items (Markov signal)
P_SWITCH = 0.65  # switch to another category of the user's own mixture (long-term signal)
# otherwise: another popular item of the current category
P_NEW_SESSION = 0.15  # mean session length ~ 6.7 visits
P_DRIFT = 0.04  # per session: swap one interest category for another
N_NEXT = 3  # "next" items per item
P_NEXT_SAME_CATEGORY = 0.8
ZIPF_S = 0.7
# Funnel continuation: view -> click -> cart -> purchase -> payment.
P_FUNNEL = (0.12, 0.35, 0.55, 0.95)
SPAN_DAYS = 30.0  # users' first events spread over this many days


@dataclass(frozen=True)
class Catalog:
    item_cat: np.ndarray  # (n_items,) category of each item
    cat_items: list[np.ndarray]  # items of each category, most popular first
    cdf_global: np.ndarray  # category c's within-category CDF shifted by c, concatenated
    cat_offset: np.ndarray  # (n_categories + 1,) start of each category in cdf_global
    item_order: np.ndarray  # items concatenated in the same order as cdf_global
    next_items: np.ndarray  # (n_items, N_NEXT)
    price: np.ndarray  # (n_items,)
    popularity: np.ndarray  # (n_items,) p(item | its category)


def user_ids(n: int) -> list[str]:
    w = max(5, len(str(n - 1)))
    return [f"u{u:0{w}d}" for u in range(n)]


def item_ids(n: int) -> list[str]:
    w = max(4, len(str(n - 1)))
    return [f"i{i:0{w}d}" for i in range(n)]


def cat_ids(n: int) -> list[str]:
    w = max(2, len(str(n - 1)))
    return [f"c{c:0{w}d}" for c in range(n)]


def catalog(cfg: SynthConfig, rng: np.random.Generator) -> Catalog:
    n_i, n_c = cfg.n_items, cfg.n_categories
    if n_c < 4 or n_i < 2 * n_c:
        raise ValueError(
            f"need n_categories >= 4 and n_items >= 2 * n_categories (got {n_i}, {n_c})"
        )
    # Every category gets at least 2 items; the rest are spread at random.
    item_cat = np.concatenate([np.repeat(np.arange(n_c), 2), rng.integers(0, n_c, n_i - 2 * n_c)])
    item_cat = rng.permutation(item_cat)
    cat_items: list[np.ndarray] = []
    cdfs: list[np.ndarray] = []
    popularity = np.zeros(n_i)
    for c in range(n_c):
        items = rng.permutation(np.flatnonzero(item_cat == c))  # random popularity rank
        p = 1.0 / np.arange(1, items.size + 1) ** ZIPF_S
        p /= p.sum()
        popularity[items] = p
        cat_items.append(items)
        cdf = np.cumsum(p)
        cdf[-1] = 1.0
        cdfs.append(c + cdf)
    cat_offset = np.zeros(n_c + 1, dtype=np.int64)
    cat_offset[1:] = np.cumsum([a.size for a in cat_items])
    cat = Catalog(
        item_cat=item_cat,
        cat_items=cat_items,
        cdf_global=np.concatenate(cdfs),
        cat_offset=cat_offset,
        item_order=np.concatenate(cat_items),
        next_items=np.zeros((n_i, N_NEXT), dtype=np.int64),
        price=np.round(np.exp(rng.normal(3.3, 0.8, n_i)), 2),  # median ~27
        popularity=popularity,
    )
    # "Next" items: mostly popular items of the same category, sometimes of another one.
    cats = item_cat[:, None].repeat(N_NEXT, 1)
    other = rng.random((n_i, N_NEXT)) >= P_NEXT_SAME_CATEGORY
    cats[other] = rng.integers(0, n_c, int(other.sum()))
    cat.next_items[:] = _sample_items(cat, cats.ravel(), rng).reshape(n_i, N_NEXT)
    return cat


def _sample_items(cat: Catalog, cats: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One Zipf-popular item from each category in `cats` (vectorised)."""
    u = cats + rng.random(cats.shape)
    pos = np.searchsorted(cat.cdf_global, u, side="right")
    pos = np.clip(pos, cat.cat_offset[cats], cat.cat_offset[cats + 1] - 1)
    return cat.item_order[pos]


def _interests(n: int, n_c: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each user's 3 interest categories (distinct) and weights (a third one for ~half)."""
    k3 = np.argsort(rng.random((n, n_c)), axis=1)[:, :3]
    w = rng.dirichlet(np.full(3, 2.0), size=n)
    two = rng.random(n) < 0.5
    w[two, 2] = 0.0
    w /= w.sum(1, keepdims=True)
    return k3, w


def _walk(cfg: SynthConfig, cat: Catalog, rng: np.random.Generator, n_visits: np.ndarray):
    """Lock-step walk of every user's item visits. Returns per-visit arrays sorted by user."""
    n_u, n_c = cfg.n_users, cfg.n_categories
    cats3, w = _interests(n_u, n_c, rng)
    cur_item = np.zeros(n_u, dtype=np.int64)
    sess_cat = np.zeros(n_u, dtype=np.int64)
    sess_no = np.full(n_u, -1, dtype=np.int64)
    out_u, out_item, out_new, out_sess = [], [], [], []
    order = np.argsort(-n_visits, kind="stable")  # active users are a prefix at every step
    n_sorted = n_visits[order]
    for t in range(int(n_visits.max())):
        n_act = int(np.searchsorted(-n_sorted, -t, side="left"))  # users with n_visits > t
        act = order[:n_act]
        new = np.ones(n_act, dtype=bool) if t == 0 else rng.random(n_act) < P_NEW_SESSION
        # Slow drift: at some session starts one interest category is replaced.
        drift = act[new & (rng.random(n_act) < P_DRIFT)]
        if drift.size:
            slot = rng.integers(0, 3, drift.size)
            cats3[drift, slot] = rng.integers(0, n_c, drift.size)
        # A switch goes to another category of the user's own mixture (inverse CDF over
        # the slots, the current category excluded): predictable from the user's
        # history, not from the last item. A session starts anywhere in the mixture.
        wa = w[act].copy()
        wa[
            ~new[:, None] & (cats3[act] == sess_cat[act][:, None]) & (wa.sum(1, keepdims=True) > wa)
        ] = 0.0
        cw = np.cumsum(wa, axis=1)
        slot = (rng.random(n_act)[:, None] * cw[:, -1:] > cw).sum(1).clip(0, 2)
        mix_cat = cats3[act, slot]
        r = rng.random(n_act)
        follow = ~new & (r < P_NEXT_ITEM)
        switch = ~new & ~follow & (r < P_NEXT_ITEM + P_SWITCH)
        c = np.where(new | switch, mix_cat, sess_cat[act])
        item = _sample_items(cat, c, rng)
        if follow.any():
            f_items = cur_item[act[follow]]
            item[follow] = cat.next_items[f_items, rng.integers(0, N_NEXT, int(follow.sum()))]
        sess_cat[act] = np.where(follow, cat.item_cat[item], c)
        sess_no[act[new]] += 1
        cur_item[act] = item
        out_u.append(act)
        out_item.append(item)
        out_new.append(new)
        out_sess.append(sess_no[act].copy())
    u = np.concatenate(out_u)
    idx = np.argsort(u, kind="stable")  # per user, in visit order
    return (
        u[idx],
        np.concatenate(out_item)[idx],
        np.concatenate(out_new)[idx],
        np.concatenate(out_sess)[idx],
    )


def _lognormal_gaps_ms(
    rng: np.random.Generator, n: int, median_s: float, sigma: float
) -> np.ndarray:
    return np.maximum(1, (median_s * 1000.0 * np.exp(sigma * rng.standard_normal(n)))).astype(
        np.int64
    )


def normal_events(
    cfg: SynthConfig, cat: Catalog, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    n_u = cfg.n_users
    events_per_visit = 1.0 + np.cumprod(P_FUNNEL).sum()
    mean_visits = max(3.0, cfg.mean_events / events_per_visit)
    sigma = 1.0
    mu = np.log(mean_visits) - sigma**2 / 2
    n_visits = np.clip(np.rint(rng.lognormal(mu, sigma, n_u)), 3, 50 * mean_visits).astype(np.int64)
    u, item, new, sess = _walk(cfg, cat, rng, n_visits)
    nv = u.size
    # Funnel depth per visit: 0 = view only ... 4 = through payment.
    depth = np.zeros(nv, dtype=np.int64)
    alive = np.ones(nv, dtype=bool)
    for p in P_FUNNEL:
        alive &= rng.random(nv) < p
        depth += alive
    reps = depth + 1
    ev_visit = np.repeat(np.arange(nv), reps)
    stage = np.arange(ev_visit.size) - np.repeat(np.cumsum(reps) - reps, reps)
    ev_u = u[ev_visit]
    ev_item = item[ev_visit]
    ne = ev_u.size
    # Gaps before each event: funnel step (seconds), next visit (tens of seconds),
    # next session (hours to days); each user's first event starts somewhere in the span.
    gap = np.where(
        stage > 0, _lognormal_gaps_ms(rng, ne, 6.0, 0.7), _lognormal_gaps_ms(rng, ne, 25.0, 0.9)
    )
    sess_start = (stage == 0) & new[ev_visit]
    gap[sess_start] = _lognormal_gaps_ms(rng, int(sess_start.sum()), 14 * 3600.0, 1.2)
    first = np.r_[True, ev_u[1:] != ev_u[:-1]]
    gap[first] = (rng.random(int(first.sum())) * SPAN_DAYS * 86_400_000).astype(np.int64)
    csum = np.cumsum(gap)
    base = np.repeat(csum[first] - gap[first], np.diff(np.r_[np.flatnonzero(first), ne]))
    ts = cfg.start_ms + (csum - base)
    et = stage.astype(np.int64)  # index into EVENT_TYPES
    qty = rng.choice([1, 1, 1, 1, 2, 2, 3], size=nv)
    amount = np.where(et >= 3, cat.price[ev_item] * qty[ev_visit], np.nan)
    return {
        "u": ev_u,
        "item": ev_item,
        "et": et,
        "ts": ts,
        "amount": np.round(amount, 2),
        "sess": sess[ev_visit],
        "label": np.zeros(ne, dtype=np.int64),
    }


def plant_anomalies(
    cfg: SynthConfig, cat: Catalog, rng: np.random.Generator, ev: dict[str, np.ndarray]
):
    """Append labelled bursts after the chosen users' normal history."""
    n_anom = int(round(cfg.anomaly_fraction * cfg.n_users))
    if n_anom <= 0:
        return ev
    users = np.sort(rng.choice(cfg.n_users, size=min(n_anom, cfg.n_users), replace=False))
    kinds = rng.permutation(np.arange(users.size) % 2) + 1  # 1 takeover, 2 card testing
    # Last event, touched categories and last session of each user.
    u = ev["u"]
    last = np.r_[np.flatnonzero(u[1:] != u[:-1]), u.size - 1]
    first = np.r_[0, last[:-1] + 1]
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ev}
    cheap = np.argsort(cat.price)[: max(3, cfg.n_items // 50)]
    for user, kind in zip(users, kinds, strict=True):
        lo, hi = first[user], last[user]
        t0 = int(ev["ts"][hi]) + int(_lognormal_gaps_ms(rng, 1, 6 * 3600.0, 1.0)[0])
        sess = int(ev["sess"][hi]) + 1
        if kind == 1:
            touched = np.unique(cat.item_cat[ev["item"][lo : hi + 1]])
            fresh = np.setdiff1d(np.arange(cfg.n_categories), touched)
            if fresh.size == 0:
                fresh = np.arange(cfg.n_categories)
            n_browse = int(rng.integers(12, 30))
            cats = rng.choice(fresh, size=min(3, fresh.size), replace=False)
            items = cat.item_order[
                rng.integers(
                    cat.cat_offset[cats], cat.cat_offset[cats + 1], size=(n_browse, cats.size)
                )[np.arange(n_browse), rng.integers(0, cats.size, n_browse)]
            ]
            et = rng.choice([0, 0, 1, 2], size=n_browse)
            n_buy = int(rng.integers(2, 6))
            buy = items[rng.integers(0, n_browse, n_buy)]
            items = np.concatenate([items, np.repeat(buy, 2)])
            et = np.concatenate([et, np.tile([3, 4], n_buy)])
            amount = np.full(items.size, np.nan)
            big = np.round(rng.uniform(400, 3000, n_buy), 2)
            amount[n_browse:] = np.repeat(big, 2)
            gaps = np.maximum(50, rng.exponential(1500.0, items.size)).astype(np.int64)
        else:
            n = int(rng.integers(10, 40))
            items = np.full(n, rng.choice(cheap))
            et = np.full(n, 4)
            amount = np.round(rng.uniform(0.5, 2.0, n), 2)
            gaps = np.maximum(200, rng.exponential(3000.0, n)).astype(np.int64)
        gaps[0] = 0
        cols["u"].append(np.full(items.size, user))
        cols["item"].append(items)
        cols["et"].append(et)
        cols["ts"].append(t0 + np.cumsum(gaps))
        cols["amount"].append(amount)
        cols["sess"].append(np.full(items.size, sess))
        cols["label"].append(np.full(items.size, kind))
    return {k: np.concatenate([ev[k], *cols[k]]) for k in ev}


def plant_bursts(cfg: SynthConfig, cat: Catalog, rng: np.random.Generator, ev: dict[str, np.ndarray]):
    """Insert one legitimate fast session for `burst_fraction` of the normal users.

    15-40 events 0.5-3 s apart: visits to popular items of the user's own top categories,
    each a view, sometimes followed by a click on the same item, rarely then a cart
    (funnel order kept). The session sits inside the user's longest gap before a session
    start (so no other event moves), or after the last event for single-session users.
    """
    labels = ev["label"]
    # The normal events are a prefix sorted by user; anomaly bursts are appended after.
    u = ev["u"][: int((labels == 0).sum())]
    n_b = int(round(cfg.burst_fraction * cfg.n_users))
    anomalous = np.unique(ev["u"][labels != 0])
    pool = np.setdiff1d(np.arange(cfg.n_users), anomalous)
    if n_b <= 0 or pool.size == 0:
        return ev
    users = np.sort(rng.choice(pool, size=min(n_b, pool.size), replace=False))
    starts = np.r_[0, np.flatnonzero(u[1:] != u[:-1]) + 1]
    ends = np.r_[starts[1:], u.size]
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ev}
    for user in users:
        lo, hi = starts[user], ends[user]
        items_u, ts_u, et_u, sess_u = ev["item"][lo:hi], ev["ts"][lo:hi], ev["et"][lo:hi], ev["sess"][lo:hi]
        cats, counts = np.unique(cat.item_cat[items_u], return_counts=True)
        own = cats[np.argsort(-counts, kind="stable")[:3]]
        n_target = int(rng.integers(15, 41))
        depth = np.minimum(rng.choice([0, 0, 0, 1, 1, 2], size=n_target), 2)
        depth = depth[: int(np.searchsorted(np.cumsum(depth + 1), n_target) + 1)]
        w = counts[np.argsort(-counts, kind="stable")[:3]].astype(np.float64)
        vcat = own[rng.choice(own.size, size=depth.size, p=w / w.sum())]
        vitem = _sample_items(cat, vcat, rng)
        items = np.repeat(vitem, depth + 1)
        et = np.arange(items.size) - np.repeat(np.cumsum(depth + 1) - (depth + 1), depth + 1)
        gaps = rng.uniform(500.0, 3000.0, items.size).astype(np.int64)
        gaps[0] = 0
        span = int(gaps.sum())
        # Candidate slots: gaps before a session start (stage 0, new session number).
        new_sess = np.flatnonzero((et_u[1:] == 0) & (sess_u[1:] != sess_u[:-1])) + 1
        room = ts_u[new_sess] - ts_u[new_sess - 1] if new_sess.size else np.zeros(0, np.int64)
        fits = room > span + 20 * 60_000
        if fits.any():
            k = new_sess[np.flatnonzero(fits)[np.argmax(room[fits])]]
            slack = int(ts_u[k] - ts_u[k - 1]) - span - 20 * 60_000
            t0 = int(ts_u[k - 1]) + 10 * 60_000 + int(rng.integers(0, slack + 1))
        else:
            t0 = int(ts_u[-1]) + int(_lognormal_gaps_ms(rng, 1, 6 * 3600.0, 1.0)[0])
        cols["u"].append(np.full(items.size, user))
        cols["item"].append(items)
        cols["et"].append(et.astype(np.int64))
        cols["ts"].append(t0 + np.cumsum(gaps))
        cols["amount"].append(np.full(items.size, np.nan))
        cols["sess"].append(np.full(items.size, int(sess_u.max()) + 1))
        cols["label"].append(np.zeros(items.size, dtype=np.int64))
    return {k: np.concatenate([ev[k], *cols[k]]) for k in ev}
