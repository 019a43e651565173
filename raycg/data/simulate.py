"""Shopping-log simulator with planted structure (the embedded default data source).

Everything is vectorised numpy and deterministic by `seed`. Writes:

    <out_dir>/items.parquet            item_id, advertiser_id, category_id, content_emb
    <out_dir>/users.parquet            user_id, segment
    <out_dir>/events/train/part-*.parquet   events before the cutoff (EVENT_SCHEMA)
    <out_dir>/events/eval/part-*.parquet    events at/after the cutoff
    <out_dir>/meta.json                sizes, cutoff, marginal statistics

Planted effects (knob in parentheses):
- users like 1-3 categories; items sit near their category centre (`item_spread`);
  clicks and conversions follow user-item affinity in a latent space;
- click-bait items: high click rate, very low conversion (`clickbait_frac`);
- genuine clicks are long, accidental clicks short (`genuine_duration_s`,
  `accidental_duration_s`);
- advertiser-level conversion propensity (`advertiser_propensity_std`);
- a feature cross: conversion depends on user segment x item tier (`cross_strength`);
- surfaces: home (no context), related (subject item near the intent), search
  (query names a category) (`surface_probs`);
- impressions without engagement; conversions are rare (`conversion_bias`) and
  delayed (`conversion_delay_mean_s`).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycg.data.schema import EVENT_SCHEMA, SURFACES

START_TS = 1_767_225_600  # 2026-01-01T00:00:00Z
DAY = 86_400


@dataclass
class SimConfig:
    seed: int = 0
    n_users: int = 2000
    n_items: int = 2000
    n_advertisers: int = 100
    n_categories: int = 20
    latent_dim: int = 16
    content_dim: int = 16
    days: int = 30
    eval_days: int = 5
    requests_per_user: float = 20.0  # mean; per-user activity is heavy-tailed
    impressions_per_request: int = 10
    num_shards: int = 4
    surface_probs: list = field(default_factory=lambda: [0.5, 0.3, 0.2])
    relevant_candidate_frac: float = 0.7  # share of impressions from the intent category
    item_spread: float = 0.6
    content_noise: float = 0.5
    click_bias: float = -5.5  # about 8% of impressions are clicked
    clickbait_frac: float = 0.05
    clickbait_click_bonus: float = 2.0
    genuine_duration_s: float = 40.0
    accidental_duration_s: float = 3.0
    save_rate: float = 0.1
    conversion_bias: float = -6.0  # about 4% of clicks convert
    advertiser_propensity_std: float = 0.8
    cross_strength: float = 1.0
    conversion_delay_mean_s: float = 3 * 3600.0


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _sample_in_category(rng, cats, item_order, cat_start, cat_cum, cum_pop):
    """Popularity-weighted item draw within each requested category (vectorised)."""
    lo, hi = cat_cum[cats], cat_cum[cats + 1]
    target = lo + rng.random(len(cats)) * (hi - lo)
    pos = np.searchsorted(cum_pop, target, side="right")
    # clamp into the category block (guards float edge cases)
    pos = np.clip(pos, cat_start[cats], cat_start[cats + 1] - 1)
    return item_order[pos]


def simulate(cfg: SimConfig) -> dict:
    """Generate tables in memory. Returns dict of pyarrow tables + meta."""
    rng = np.random.default_rng(cfg.seed)
    C, d = cfg.n_categories, cfg.latent_dim

    # --- categories, advertisers, items -------------------------------------------------
    centers = _normalise(rng.normal(size=(C, d)))
    cat_weight = 1.0 / np.arange(1, C + 1) ** 0.8
    cat_weight /= cat_weight.sum()
    item_cat = rng.choice(C, size=cfg.n_items, p=cat_weight)
    item_vec = _normalise(centers[item_cat] + cfg.item_spread * rng.normal(size=(cfg.n_items, d)) / np.sqrt(d))
    adv_cat = rng.choice(C, size=cfg.n_advertisers, p=cat_weight)
    # items belong to an advertiser of their own category when one exists
    item_adv = np.empty(cfg.n_items, dtype=np.int64)
    for c in range(C):
        idx = np.flatnonzero(item_cat == c)
        advs = np.flatnonzero(adv_cat == c)
        pool = advs if len(advs) else np.arange(cfg.n_advertisers)
        item_adv[idx] = rng.choice(pool, size=len(idx))
    adv_propensity = rng.normal(0.0, cfg.advertiser_propensity_std, size=cfg.n_advertisers)
    item_logpop = rng.normal(0.0, 1.0, size=cfg.n_items)
    clickbait = rng.random(cfg.n_items) < cfg.clickbait_frac
    item_tier = rng.integers(0, 2, size=cfg.n_items)  # e.g. budget / premium
    proj = rng.normal(size=(d, cfg.content_dim)) / np.sqrt(d)
    content = (item_vec + cfg.content_noise * rng.normal(size=item_vec.shape) / np.sqrt(d)) @ proj

    # popularity-weighted sampling structures, items grouped by category
    item_order = np.argsort(item_cat, kind="stable")
    pop = np.exp(item_logpop[item_order])
    cum_pop = np.cumsum(pop)
    counts = np.bincount(item_cat, minlength=C)
    cat_start = np.concatenate([[0], np.cumsum(counts)])
    cat_cum = np.concatenate([[0.0], cum_pop])[cat_start]
    global_p = np.exp(item_logpop) / np.exp(item_logpop).sum()

    # --- users ------------------------------------------------------------------------
    U = cfg.n_users
    n_fav = rng.integers(1, 4, size=U)
    fav = rng.choice(C, size=(U, 3), p=cat_weight)
    fav_mask = np.arange(3)[None, :] < n_fav[:, None]
    user_vec = _normalise((centers[fav] * fav_mask[..., None]).sum(1) + 0.3 * rng.normal(size=(U, d)) / np.sqrt(d))
    user_segment = rng.integers(0, 2, size=U)
    activity = rng.lognormal(0.0, 0.8, size=U)
    activity /= activity.sum()

    # --- requests ---------------------------------------------------------------------
    R = int(U * cfg.requests_per_user)
    req_user = rng.choice(U, size=R, p=activity)
    req_surface = rng.choice(len(SURFACES), size=R, p=np.asarray(cfg.surface_probs) / np.sum(cfg.surface_probs))
    fav_pick = rng.integers(0, n_fav[req_user])
    explore = rng.random(R) < 0.2
    req_cat = np.where(explore, rng.choice(C, size=R, p=cat_weight), fav[req_user, fav_pick])
    subject = _sample_in_category(rng, req_cat, item_order, cat_start, cat_cum, cum_pop)
    req_context = np.where(req_surface == 1, subject, -1)
    req_query = np.where(req_surface == 2, req_cat, -1)
    intent = user_vec[req_user]
    intent = np.where((req_surface == 1)[:, None], _normalise(intent + item_vec[subject]), intent)
    intent = np.where((req_surface == 2)[:, None], _normalise(intent + centers[req_cat]), intent)
    req_ts = START_TS + rng.integers(0, cfg.days * DAY, size=R)

    # --- impressions ------------------------------------------------------------------
    m = cfg.impressions_per_request
    imp_req = np.repeat(np.arange(R), m)
    relevant = rng.random(R * m) < cfg.relevant_candidate_frac
    cand_rel = _sample_in_category(rng, req_cat[imp_req], item_order, cat_start, cat_cum, cum_pop)
    cand_glob = rng.choice(cfg.n_items, size=R * m, p=global_p)
    imp_item = np.where(relevant, cand_rel, cand_glob)
    aff = np.einsum("nd,nd->n", intent[imp_req], item_vec[imp_item])

    click_logit = cfg.click_bias + 4.0 * aff + 0.3 * item_logpop[imp_item] + cfg.clickbait_click_bonus * clickbait[imp_item]
    clicked = rng.random(R * m) < _sigmoid(click_logit)
    genuine_p = _sigmoid(6.0 * aff - 2.0 - 3.0 * clickbait[imp_item])
    genuine = clicked & (rng.random(R * m) < genuine_p)
    duration = np.where(
        genuine,
        rng.lognormal(np.log(cfg.genuine_duration_s), 0.8, size=R * m),
        rng.lognormal(np.log(cfg.accidental_duration_s), 0.7, size=R * m),
    ).astype(np.float32)
    saved = genuine & (rng.random(R * m) < cfg.save_rate)

    seg = user_segment[req_user[imp_req]]
    tier = item_tier[imp_item]
    cross = cfg.cross_strength * np.where(seg == tier, 1.0, -1.0)
    conv_logit = (
        cfg.conversion_bias + 3.0 * aff + adv_propensity[item_adv[imp_item]] + cross - 4.0 * clickbait[imp_item]
    )
    converted = genuine & (rng.random(R * m) < _sigmoid(conv_logit))
    conv_type = np.where(rng.random(R * m) < 0.6, "add_to_cart", "checkout")
    delay = rng.exponential(cfg.conversion_delay_mean_s, size=R * m).astype(np.int64)

    imp_ts = req_ts[imp_req] + np.tile(np.arange(m) * 5, R)

    def rows(mask, etype, ts, dur):
        idx = np.flatnonzero(mask)
        r = imp_req[idx]
        et = etype[idx] if isinstance(etype, np.ndarray) else np.full(len(idx), etype, dtype=object)
        return dict(
            user_id=req_user[r], item_id=imp_item[idx], advertiser_id=item_adv[imp_item[idx]],
            surface=np.asarray(SURFACES, dtype=object)[req_surface[r]], event_type=et.astype(object),
            click_duration=dur[idx] if dur is not None else np.zeros(len(idx), np.float32),
            timestamp=ts[idx], context_item_id=req_context[r], query_id=req_query[r],
        )

    parts = [
        rows(~clicked, "impression", imp_ts, None),
        rows(clicked, "click", imp_ts + 1, duration),
        rows(saved, "save", imp_ts + 1 + duration.astype(np.int64), None),
        rows(converted, conv_type, imp_ts + 1 + delay, None),
    ]
    events = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    events_tbl = pa.table({f.name: pa.array(events[f.name], type=f.type) for f in EVENT_SCHEMA}, schema=EVENT_SCHEMA)

    items_tbl = pa.table({
        "item_id": pa.array(np.arange(cfg.n_items, dtype=np.int64)),
        "advertiser_id": pa.array(item_adv),
        "category_id": pa.array(item_cat.astype(np.int64)),
        "tier": pa.array(item_tier.astype(np.int64)),
        "content_emb": pa.FixedSizeListArray.from_arrays(
            pa.array(content.astype(np.float32).ravel()), cfg.content_dim),
    })
    users_tbl = pa.table({
        "user_id": pa.array(np.arange(U, dtype=np.int64)),
        "segment": pa.array(user_segment.astype(np.int64)),
    })
    cutoff = START_TS + (cfg.days - cfg.eval_days) * DAY
    meta = {
        "source": "simulator", "config": asdict(cfg), "cutoff_ts": int(cutoff),
        "n_events": events_tbl.num_rows, "n_impressions_shown": int(R * m),
        "n_clicks": int(clicked.sum()), "n_conversions": int(converted.sum()),
        "conversion_per_click": float(converted.sum() / max(clicked.sum(), 1)),
        "clickbait_items": int(clickbait.sum()),
    }
    return {"events": events_tbl, "items": items_tbl, "users": users_tbl, "meta": meta}


def time_split(events: pa.Table, cutoff_ts: int) -> tuple[pa.Table, pa.Table]:
    """Train = events strictly before the cutoff; eval = at or after it."""
    ts = events.column("timestamp").to_numpy()
    return events.filter(pa.array(ts < cutoff_ts)), events.filter(pa.array(ts >= cutoff_ts))


def write_shards(table: pa.Table, directory: str, num_shards: int, seed: int) -> list[str]:
    """Shuffle rows (so in-batch negatives are not all one user's session) and shard."""
    os.makedirs(directory, exist_ok=True)
    perm = np.random.default_rng(seed).permutation(table.num_rows)
    table = table.take(pa.array(perm))
    paths = []
    for i, chunk in enumerate(np.array_split(np.arange(table.num_rows), num_shards)):
        path = os.path.join(directory, f"part-{i:05d}.parquet")
        pq.write_table(table.slice(int(chunk[0]), len(chunk)) if len(chunk) else table.slice(0, 0), path)
        paths.append(path)
    return paths


def write_dataset(cfg: SimConfig, out_dir: str) -> dict:
    """Simulate and write the dataset layout described in the module docstring."""
    out = simulate(cfg)
    train, evaluation = time_split(out["events"], out["meta"]["cutoff_ts"])
    write_shards(train, os.path.join(out_dir, "events", "train"), cfg.num_shards, cfg.seed)
    write_shards(evaluation, os.path.join(out_dir, "events", "eval"), max(1, cfg.num_shards // 2), cfg.seed + 1)
    pq.write_table(out["items"], os.path.join(out_dir, "items.parquet"))
    pq.write_table(out["users"], os.path.join(out_dir, "users.parquet"))
    meta = dict(out["meta"], n_train_events=train.num_rows, n_eval_events=evaluation.num_rows)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta
