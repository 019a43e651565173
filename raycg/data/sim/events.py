"""Requests -> impressions -> events for a set of users of the world (the planted effects of
docs/simulator.md), as a table in the simulated event schema."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from raycg.data.schema import EVENT_TYPES, SURFACES
from raycg.data.sim.config import DAY, SIM_EVENT_SCHEMA, START_TS, SimConfig
from raycg.data.sim.world import _normalise, _sample_in_category

_AFF_CHUNK = 1 << 20  # rows per chunk of the affinity dot product (bounds the (rows, d) gathers)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _string_column(values: tuple[str, ...], codes: np.ndarray) -> pa.Array:
    return pa.array(values, pa.string()).take(pa.array(codes))


def _simulate_events(cfg: SimConfig, w: dict, rng: np.random.Generator, req_user: np.ndarray,
                     user_offset: int = 0) -> tuple[pa.Table, dict]:
    """Requests -> impressions -> events for the given request owners.

    `req_user` indexes the user arrays of `w` (which may be one block's slice of them);
    `user_offset` is added to make the written `user_id`. Consumes `rng` in the same order
    as the original single-pass simulator, so the in-memory path's output is unchanged.
    """
    C = cfg.n_categories
    item_order, cat_start, cat_cum, cum_pop = w["item_order"], w["cat_start"], w["cat_cum"], w["cum_pop"]
    centers, item_vec, fav, n_fav = w["centers"], w["item_vec"], w["fav"], w["n_fav"]
    item_logpop, clickbait, item_adv = w["item_logpop"], w["clickbait"], w["item_adv"]

    # --- requests ---------------------------------------------------------------------
    R = len(req_user)
    req_surface = rng.choice(len(SURFACES), size=R, p=np.asarray(cfg.surface_probs) / np.sum(cfg.surface_probs))
    fav_pick = rng.integers(0, n_fav[req_user])
    explore = rng.random(R) < 0.2
    req_cat = np.where(explore, rng.choice(C, size=R, p=w["cat_weight"]), fav[req_user, fav_pick])
    subject = _sample_in_category(rng, req_cat, item_order, cat_start, cat_cum, cum_pop)
    req_context = np.where(req_surface == 1, subject, -1)
    req_query = np.where(req_surface == 2, req_cat, -1)
    intent = w["user_vec"][req_user]
    intent = np.where((req_surface == 1)[:, None], _normalise(intent + item_vec[subject]), intent)
    intent = np.where((req_surface == 2)[:, None], _normalise(intent + centers[req_cat]), intent)
    req_ts = START_TS + rng.integers(0, cfg.days * DAY, size=R)

    # --- impressions ------------------------------------------------------------------
    m = cfg.impressions_per_request
    N = R * m
    imp_req = np.repeat(np.arange(R), m)
    relevant = rng.random(N) < cfg.relevant_candidate_frac
    cand_rel = _sample_in_category(rng, req_cat[imp_req], item_order, cat_start, cat_cum, cum_pop)
    cand_glob = rng.choice(cfg.n_items, size=N, p=w["global_p"])
    imp_item = np.where(relevant, cand_rel, cand_glob)
    del relevant, cand_rel, cand_glob
    complement = w.get("complement")
    if complement is not None and cfg.complement_candidate_frac > 0:
        # related: a share of the impressions comes from the complement of the context's category
        extra = rng.spawn(1)[0]  # draws nothing from `rng`: every later draw is the same with the knob off
        swap = np.flatnonzero((req_surface[imp_req] == 1) & (extra.random(N) < cfg.complement_candidate_frac))
        imp_item[swap] = _sample_in_category(extra, complement[w["item_cat"][subject[imp_req[swap]]]], item_order,
                                             cat_start, cat_cum, cum_pop)
    aff = np.empty(N)
    for s in range(0, N, _AFF_CHUNK):  # chunked: the (rows, d) gathers stay small
        sl = slice(s, s + _AFF_CHUNK)
        aff[sl] = np.einsum("nd,nd->n", intent[imp_req[sl]], item_vec[imp_item[sl]])
    del intent

    bait = clickbait[imp_item]
    # planted higher-order effects (0 when their knob is off); `effects` records where each applies
    imp_surface = req_surface[imp_req]
    is_complement = np.zeros(N, bool)
    if complement is not None:
        is_complement = (imp_surface == 1) & (w["item_cat"][imp_item] == complement[w["item_cat"][subject[imp_req]]])
    click_logit = cfg.click_bias + 4.0 * aff + 0.3 * item_logpop[imp_item] + cfg.clickbait_click_bonus * bait
    click_logit += cfg.complement_strength * is_complement
    clicked = rng.random(N) < _sigmoid(click_logit)
    # the complement bonus's own size: expected CTR of those impressions with and without it
    click_lift = [float(_sigmoid(click_logit[is_complement]).sum()),
                  float(_sigmoid(click_logit[is_complement] - cfg.complement_strength).sum())]
    del click_logit
    genuine_p = _sigmoid(6.0 * aff - 2.0 - 3.0 * bait)
    genuine = clicked & (rng.random(N) < genuine_p)
    del genuine_p
    duration = np.where(
        genuine,
        rng.lognormal(np.log(cfg.genuine_duration_s), 0.8, size=N),
        rng.lognormal(np.log(cfg.accidental_duration_s), 0.7, size=N),
    ).astype(np.float32)
    saved = genuine & (rng.random(N) < cfg.save_rate)

    seg = w["user_segment"][req_user[imp_req]]
    tier = w["item_tier"][imp_item]
    match = seg == tier
    del seg, tier
    cross = cfg.cross_strength * np.where(match, 1.0, -1.0)
    # a pure third-order effect: with home on half the requests and balanced segments and tiers,
    # no pair of the three variables carries it alone
    order3 = match != (imp_surface == 0)
    qa = np.zeros(N, np.int8)
    if w.get("qa_sign") is not None:
        qa = np.where(imp_surface == 2, w["qa_sign"][req_cat[imp_req], item_adv[imp_item]], 0).astype(np.int8)
    taste = np.zeros(N, np.int8)
    if w.get("taste_sign") is not None:
        taste = w["taste_sign"][w["taste_group"][req_user[imp_req]], item_adv[imp_item]]
    conv_logit = (
        cfg.conversion_bias + 3.0 * aff + w["adv_propensity"][item_adv[imp_item]] + cross - 4.0 * bait
        + cfg.order3_strength * np.where(order3, 1.0, -1.0) + cfg.complement_strength * is_complement
        + cfg.query_advertiser_strength * qa + cfg.user_advertiser_strength * taste
    )
    del aff
    converted = genuine & (rng.random(N) < _sigmoid(conv_logit))
    # each interaction: where it favours / disfavours, and its term in the conversion logit
    effects = {"segment_x_tier": (match, ~match, cross)}
    if cfg.order3_strength:
        effects["segment_x_tier_x_surface"] = (order3, ~order3, cfg.order3_strength * np.where(order3, 1.0, -1.0))
    if complement is not None:
        effects["context_x_category"] = (is_complement, (imp_surface == 1) & ~is_complement,
                                         cfg.complement_strength * is_complement)
    if w.get("qa_sign") is not None:
        effects["query_x_advertiser"] = (qa > 0, qa < 0, cfg.query_advertiser_strength * qa)
    if w.get("taste_sign") is not None:
        effects["user_x_advertiser"] = (taste > 0, taste < 0, cfg.user_advertiser_strength * taste)
    planted = {}
    for name, (fav, dis, term) in effects.items():
        row = []
        for side in (fav, dis):  # observed counts, then the expected conversion rate of its genuine
            g = side & genuine   # clicks with and without the term (the effect's own size)
            row += [int(side.sum()), int((side & clicked).sum()), int((side & converted).sum()), int(g.sum()),
                    float(_sigmoid(conv_logit[g]).sum()), float(_sigmoid(conv_logit[g] - term[g]).sum())]
        planted[name] = row + (click_lift if name == "context_x_category" else [])
    del conv_logit, genuine, cross, effects, taste
    ATC, CHECKOUT = EVENT_TYPES.index("add_to_cart"), EVENT_TYPES.index("checkout")
    conv_type = np.where(rng.random(N) < 0.6, ATC, CHECKOUT).astype(np.int8)
    delay = rng.exponential(cfg.conversion_delay_mean_s, size=N).astype(np.int64)

    imp_ts = req_ts[imp_req] + np.tile(np.arange(m) * 5, R)

    def rows(mask, etype, ts, dur, request_ts=None):
        idx = np.flatnonzero(mask)
        r = imp_req[idx]
        et = etype[idx] if isinstance(etype, np.ndarray) else np.full(len(idx), EVENT_TYPES.index(etype), np.int8)
        return dict(
            user_id=req_user[r] + user_offset, item_id=imp_item[idx], advertiser_id=item_adv[imp_item[idx]],
            surface=req_surface[r].astype(np.int8), event_type=et,
            click_duration=dur[idx] if dur is not None else np.zeros(len(idx), np.float32),
            timestamp=ts[idx], context_item_id=req_context[r], query_id=req_query[r],
            request_ts=request_ts[idx] if request_ts is not None else np.full(len(idx), -1, np.int64),
        )

    parts = [
        rows(~clicked, "impression", imp_ts, None),
        rows(clicked, "click", imp_ts + 1, duration),
        rows(saved, "save", imp_ts + 1 + duration.astype(np.int64), None),
        # a conversion is reported later and belongs to the request (the click) that led to it
        rows(converted, conv_type, imp_ts + 1 + delay, None, request_ts=imp_ts + 1),
    ]
    events = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    del parts
    events, n_duplicates = _drop_exact_duplicates(events)
    cols = {}
    for f in SIM_EVENT_SCHEMA:
        if f.name == "surface":
            cols[f.name] = _string_column(SURFACES, events[f.name])
        elif f.name == "event_type":
            cols[f.name] = _string_column(EVENT_TYPES, events[f.name])
        else:
            cols[f.name] = pa.array(events[f.name], type=f.type)
    events_tbl = pa.table(cols, schema=SIM_EVENT_SCHEMA)
    counts = {"n_events": events_tbl.num_rows, "n_impressions_shown": int(N),
              "n_clicks": int(clicked.sum()), "n_conversions": int(converted.sum()),
              "n_duplicates_dropped": n_duplicates, "planted": planted}
    return events_tbl, counts


def _drop_exact_duplicates(events: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """Drop rows equal in every column to an earlier row; returns (events, rows dropped).

    Two requests of one user a few seconds apart can show the same item at the same second
    (and two saves can land on the same second): a log would then hold one event twice, which
    the data checks reject. Rare (first seen at 200k users: one row in an eval shard of 260k), so only rows whose
    (user, item, timestamp, event type) key repeats are compared column by column.
    """
    key = (events["user_id"].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
           ^ events["item_id"].astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
           ^ events["timestamp"].astype(np.uint64) * np.uint64(0x165667B19E3779F9)
           ^ events["event_type"].astype(np.uint64))
    order = np.argsort(key, kind="stable")
    same = key[order][1:] == key[order][:-1]
    if not same.any():
        return events, 0
    candidates = np.zeros(len(key), dtype=bool)
    candidates[order[1:][same]] = candidates[order[:-1][same]] = True
    idx = np.flatnonzero(candidates)
    import pandas as pd

    dup = pd.DataFrame({k: v[idx] for k, v in events.items()}).duplicated(keep="first").to_numpy()
    if not dup.any():
        return events, 0
    keep = np.ones(len(key), dtype=bool)
    keep[idx[dup]] = False
    return {k: v[keep] for k, v in events.items()}, int(dup.sum())
