"""The simulated world: categories, advertisers, items and users (everything but the
requests), built once from the seed; the item and user tables and the meta written about it."""
from __future__ import annotations

import platform
from dataclasses import asdict

import numpy as np
import pyarrow as pa

from raycg.data.sim.config import DATA_FORMAT, SimConfig


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _sample_in_category(rng, cats, item_order, cat_start, cat_cum, cum_pop):
    """Popularity-weighted item draw within each requested category (vectorised)."""
    lo, hi = cat_cum[cats], cat_cum[cats + 1]
    target = lo + rng.random(len(cats)) * (hi - lo)
    pos = np.searchsorted(cum_pop, target, side="right")
    # clamp into the category block (guards float edge cases)
    pos = np.clip(pos, cat_start[cats], cat_start[cats + 1] - 1)
    return item_order[pos]


def _make_world(cfg: SimConfig, rng: np.random.Generator) -> dict:
    """Categories, advertisers, items and users (everything but the requests)."""
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
    item_logpop = rng.normal(0.0, cfg.popularity_sigma, size=cfg.n_items)
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
    activity = rng.lognormal(0.0, cfg.activity_sigma, size=U)
    activity /= activity.sum()
    # higher-order effects: from a child generator (spawning draws nothing from `rng`), so the
    # world and the requests are the same with the knobs on or off
    extra = rng.spawn(1)[0]
    complement = qa_sign = taste_group = taste_sign = None
    if (cfg.complement_strength or cfg.complement_candidate_frac) and C > 1:
        complement = (np.arange(C) + extra.integers(1, C, size=C)) % C  # never the category itself
    if cfg.query_advertiser_strength:
        qa_sign = extra.choice(np.array([-1, 1], np.int8), size=(C, cfg.n_advertisers))
    if cfg.user_advertiser_strength:
        # brand taste: a hidden group per user (no feature shows it) and one sign per (group,
        # advertiser); a user's few conversions spread over the advertiser's many items
        # (drawn after the other effects' draws, so turning it on leaves theirs the same)
        G = int(cfg.user_taste_groups)
        if G < 1:
            raise ValueError(f"data.sim.user_taste_groups={G}: expected at least 1")
        taste_group = extra.integers(0, G, size=U)
        # half of the groups favour each advertiser: a pure interaction, no advertiser-wide offset
        rank = extra.random((G, cfg.n_advertisers)).argsort(0).argsort(0)
        taste_sign = np.where(rank < G // 2, 1, -1).astype(np.int8)
    return dict(complement=complement, qa_sign=qa_sign, taste_group=taste_group, taste_sign=taste_sign,
        centers=centers, cat_weight=cat_weight, item_cat=item_cat, item_vec=item_vec, item_adv=item_adv,
        adv_propensity=adv_propensity, item_logpop=item_logpop, clickbait=clickbait, item_tier=item_tier,
        content=content, item_order=item_order, cum_pop=cum_pop, cat_start=cat_start, cat_cum=cat_cum,
        global_p=global_p, n_fav=n_fav, fav=fav, user_vec=user_vec, user_segment=user_segment,
        activity=activity,
    )


def _item_user_tables(cfg: SimConfig, w: dict) -> tuple[pa.Table, pa.Table]:
    items_tbl = pa.table({
        "item_id": pa.array(np.arange(cfg.n_items, dtype=np.int64)),
        "advertiser_id": pa.array(w["item_adv"]),
        "category_id": pa.array(w["item_cat"].astype(np.int64)),
        "tier": pa.array(w["item_tier"].astype(np.int64)),
        "content_emb": pa.FixedSizeListArray.from_arrays(
            pa.array(w["content"].astype(np.float32).ravel()), cfg.content_dim),
    })
    users_tbl = pa.table({
        "user_id": pa.array(np.arange(cfg.n_users, dtype=np.int64)),
        "segment": pa.array(w["user_segment"].astype(np.int64)),
    })
    return items_tbl, users_tbl


def _base_meta(cfg: SimConfig, w: dict, counts: dict) -> dict:
    return {
        "source": "simulator", "format": DATA_FORMAT, "config": asdict(cfg), "cutoff_ts": int(cfg.cutoff_ts),
        "n_events": int(counts["n_events"]), "n_impressions_shown": int(counts["n_impressions_shown"]),
        "n_clicks": int(counts["n_clicks"]), "n_conversions": int(counts["n_conversions"]),
        "conversion_per_click": float(counts["n_conversions"] / max(counts["n_clicks"], 1)),
        "n_duplicates_dropped": int(counts.get("n_duplicates_dropped", 0)),
        "clickbait_items": int(w["clickbait"].sum()),
        "planted": planted_effects(counts.get("planted", {})),
        # one seed repeats the events on one machine but not exactly across machines (0.01% of clicks
        # differed at 10x; cause not traced, numpy build or CPU suspected): docs/simulator.md
        "generated_with": {"numpy": np.__version__, "machine": platform.machine()},
    }


def planted_effects(counts: dict) -> dict:
    """Each planted interaction's measured size (raycg.data.sim.events), [favoured, disfavoured]:
    observed CTR and conversions per click, and the expected conversions per genuine click of
    those impressions with the effect's term and without it (its own size, free of the other
    terms that differ between the two sides); for the complement effect also the expected CTR
    of its impressions with and without the click bonus."""
    out = {}
    for name, v in counts.items():
        v = [float(x) for x in v]
        sides = [v[0:6], v[6:12]]
        r = lambda a, b: round(a / b, 5) if b else None  # noqa: E731
        out[name] = {
            "impressions": [int(s[0]) for s in sides],
            "ctr": [r(s[1], s[0]) for s in sides],
            "conversions_per_click": [r(s[2], s[1]) for s in sides],
            "expected_conversions_per_genuine_click_with_without": [[r(s[4], s[3]), r(s[5], s[3])] for s in sides],
        }
        if len(v) > 12:
            out[name]["expected_ctr_with_without"] = [r(v[12], sides[0][0]), r(v[13], sides[0][0])]
    return out
