"""Shopping-log simulator with planted structure (the embedded default data source).

Everything is vectorised numpy and deterministic by `seed`. Writes:

    <out_dir>/items.parquet            item_id, advertiser_id, category_id, tier, content_emb
    <out_dir>/users.parquet            user_id, segment
    <out_dir>/events/train/part-*.parquet   events before the cutoff (EVENT_SCHEMA + request_ts)
    <out_dir>/events/eval/part-*.parquet    events at/after the cutoff
    <out_dir>/meta.json                sizes, cutoff, marginal statistics

Planted effects (knob in parentheses; docs/simulator.md says what each one tests):
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

Two ways to produce the same kind of data (`write_dataset`):
- in memory (small configs, tests): `simulate()` builds every table on the driver, then
  the events are split by time and written as `num_shards` / `num_shards // 2` shuffled shards;
- scale-out (more than `parallel_min_impressions` impressions, or `parallel=True`): the
  world (categories, items, advertisers, users and each user's number of requests) is built
  once on the driver from `seed`; requests, impressions and events are simulated in blocks of
  `users_per_block` users by Ray tasks, each seeded by SeedSequence(seed, spawn_key=(block,)),
  each writing its own `part-<block>.parquet` in events/train and events/eval. The output
  depends only on (config, number of blocks), never on task scheduling.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycg.data.datadir import clear_shards, time_split, write_atomic, write_shards
from raycg.data.schema import EVENT_SCHEMA, EVENT_TYPES, REQUEST_TS, SURFACES

# The simulator writes the attribution column: conversions carry their click's time.
SIM_EVENT_SCHEMA = EVENT_SCHEMA.append(pa.field(REQUEST_TS.name, REQUEST_TS.arrow_type, nullable=False))
# Bumped when the simulator's output changes for the same SimConfig (cached data is re-simulated).
DATA_FORMAT = 2  # 2: request_ts attribution column

START_TS = 1_767_225_600  # 2026-01-01T00:00:00Z
DAY = 86_400
_AFF_CHUNK = 1 << 20  # rows per chunk of the affinity dot product (bounds the (rows, d) gathers)


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
    num_shards: int = 4  # in-memory path: train shards (eval gets half); scale-out: one file per block
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
    # scale-out path (write_dataset): above this many impressions, simulate in Ray tasks
    parallel_min_impressions: int = 5_000_000
    # users per Ray task; bounds a task's memory: about 350 B per impression on top of a ~200 MB
    # worker (10k users x 20 requests x 10 impressions -> ~0.9 GB) and sets the shard size
    users_per_block: int = 10_000

    @property
    def n_impressions(self) -> int:
        return int(self.n_users * self.requests_per_user) * self.impressions_per_request

    @property
    def cutoff_ts(self) -> int:
        return START_TS + (self.days - self.eval_days) * DAY


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
    return dict(
        centers=centers, cat_weight=cat_weight, item_cat=item_cat, item_vec=item_vec, item_adv=item_adv,
        adv_propensity=adv_propensity, item_logpop=item_logpop, clickbait=clickbait, item_tier=item_tier,
        content=content, item_order=item_order, cum_pop=cum_pop, cat_start=cat_start, cat_cum=cat_cum,
        global_p=global_p, n_fav=n_fav, fav=fav, user_vec=user_vec, user_segment=user_segment,
        activity=activity,
    )


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
    aff = np.empty(N)
    for s in range(0, N, _AFF_CHUNK):  # chunked: the (rows, d) gathers stay small
        sl = slice(s, s + _AFF_CHUNK)
        aff[sl] = np.einsum("nd,nd->n", intent[imp_req[sl]], item_vec[imp_item[sl]])
    del intent

    bait = clickbait[imp_item]
    click_logit = cfg.click_bias + 4.0 * aff + 0.3 * item_logpop[imp_item] + cfg.clickbait_click_bonus * bait
    clicked = rng.random(N) < _sigmoid(click_logit)
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
    cross = cfg.cross_strength * np.where(seg == tier, 1.0, -1.0)
    del seg, tier
    conv_logit = (
        cfg.conversion_bias + 3.0 * aff + w["adv_propensity"][item_adv[imp_item]] + cross - 4.0 * bait
    )
    del cross, aff
    converted = genuine & (rng.random(N) < _sigmoid(conv_logit))
    del conv_logit, genuine
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
              "n_duplicates_dropped": n_duplicates}
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
    }


def simulate(cfg: SimConfig) -> dict:
    """Generate tables in memory. Returns dict of pyarrow tables + meta."""
    rng = np.random.default_rng(cfg.seed)
    w = _make_world(cfg, rng)
    R = int(cfg.n_users * cfg.requests_per_user)
    req_user = rng.choice(cfg.n_users, size=R, p=w["activity"])
    events_tbl, counts = _simulate_events(cfg, w, rng, req_user)
    items_tbl, users_tbl = _item_user_tables(cfg, w)
    return {"events": events_tbl, "items": items_tbl, "users": users_tbl, "meta": _base_meta(cfg, w, counts)}


def use_parallel(cfg: SimConfig, parallel: bool | None = None) -> bool:
    """The path `write_dataset` takes: forced by `parallel`, else by size."""
    if parallel is not None:
        return bool(parallel)
    return cfg.n_impressions > cfg.parallel_min_impressions


def write_dataset(cfg: SimConfig, out_dir: str, parallel: bool | None = None) -> dict:
    """Simulate and write the dataset layout described in the module docstring.

    `parallel=None` picks the scale-out path (Ray tasks, one shard pair per user block)
    when the config has more than `cfg.parallel_min_impressions` impressions; True/False
    force a path. Returns meta (also written to meta.json).
    """
    if use_parallel(cfg, parallel):
        return _write_dataset_parallel(cfg, out_dir)
    out = simulate(cfg)
    train, evaluation = time_split(out["events"], out["meta"]["cutoff_ts"])
    clear_shards(out_dir)
    write_shards(train, os.path.join(out_dir, "events", "train"), cfg.num_shards, cfg.seed)
    write_shards(evaluation, os.path.join(out_dir, "events", "eval"), max(1, cfg.num_shards // 2), cfg.seed + 1)
    pq.write_table(out["items"], os.path.join(out_dir, "items.parquet"))
    pq.write_table(out["users"], os.path.join(out_dir, "users.parquet"))
    meta = dict(out["meta"], n_train_events=train.num_rows, n_eval_events=evaluation.num_rows)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


# --- scale-out path ------------------------------------------------------------------------

def block_seed(seed: int, block: int) -> np.random.SeedSequence:
    """The seed of user block `block`: independent of the driver's stream and of other blocks."""
    return np.random.SeedSequence(seed, spawn_key=(block,))


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 20) if sys.platform == "darwin" else r / 1024


def _simulate_block(cfg_dict: dict, world: dict, block: int, lo: int, hi: int, req_counts: np.ndarray,
                    out_dir: str) -> dict:
    """One Ray task: simulate users [lo, hi), split by time, write its own train/eval shard."""
    t0 = time.perf_counter()
    cfg = SimConfig(**cfg_dict)
    rng = np.random.default_rng(block_seed(cfg.seed, block))
    user_keys = ("n_fav", "fav", "user_vec", "user_segment")
    w = {k: (v[lo:hi] if k in user_keys else v) for k, v in world.items()}
    req_user = np.repeat(np.arange(hi - lo), req_counts)
    events, counts = _simulate_events(cfg, w, rng, req_user, user_offset=lo)
    del req_user
    train, evaluation = time_split(events, cfg.cutoff_ts)
    del events
    files = {"train": 0, "eval": 0}
    for split, table in (("train", train), ("eval", evaluation)):
        path = os.path.join(out_dir, "events", split, f"part-{block:05d}.parquet")
        if table.num_rows:  # an empty shard is not valid input (schema.check_parquet_files)
            # shuffle so in-batch negatives are not all one user's session
            write_atomic(table.take(pa.array(rng.permutation(table.num_rows))), path)
            files[split] = 1
    counts.update(n_train_events=train.num_rows, n_eval_events=evaluation.num_rows,
                  n_train_files=files["train"], n_eval_files=files["eval"])
    # not deterministic, never written to meta.json: progress and memory reporting only
    counts["_seconds"] = time.perf_counter() - t0
    counts["_peak_rss_mb"] = _peak_rss_mb()
    return counts


_REMOTE = None


def _remote_block():
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(num_cpus=1, max_retries=3)(_simulate_block)
    return _REMOTE


def _log(msg: str) -> None:
    print(f"[raycg.sim] {msg}", flush=True)


def _rate(n: int, seconds: float) -> str:
    r = n / max(seconds, 1e-9)
    return f"{r / 1e6:.2f}M events/s" if r >= 1e5 else f"{r / 1e3:.1f}k events/s"


def _write_dataset_parallel(cfg: SimConfig, out_dir: str, progress_every_s: float = 5.0) -> dict:
    import ray

    t0 = time.perf_counter()
    started_ray = False
    if not ray.is_initialized():
        _log("Ray is not initialised: starting a local Ray (address='local') for the parallel simulator")
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
        started_ray = True
    try:
        rng = np.random.default_rng(cfg.seed)
        world = _make_world(cfg, rng)  # the same world (items, users) as the in-memory path
        R = int(cfg.n_users * cfg.requests_per_user)
        req_counts = rng.multinomial(R, world["activity"])  # requests per user, heavy-tailed
        items_tbl, users_tbl = _item_user_tables(cfg, world)

        clear_shards(out_dir)
        pq.write_table(items_tbl, os.path.join(out_dir, "items.parquet"))
        pq.write_table(users_tbl, os.path.join(out_dir, "users.parquet"))

        upb = max(1, int(cfg.users_per_block))
        bounds = [(lo, min(lo + upb, cfg.n_users)) for lo in range(0, cfg.n_users, upb)]
        n_blocks = len(bounds)
        shared = {k: v for k, v in world.items() if k not in ("content", "activity", "item_cat")}
        world_ref = ray.put(shared)
        cfg_dict = asdict(cfg)
        out_abs = os.path.abspath(out_dir)
        _log(f"simulating {cfg.n_users:,} users, {R:,} requests, {R * cfg.impressions_per_request:,} "
             f"impressions in {n_blocks} Ray tasks of <= {upb:,} users -> {out_abs}")
        task = _remote_block()
        pending = {task.remote(cfg_dict, world_ref, b, lo, hi, req_counts[lo:hi], out_abs): b
                   for b, (lo, hi) in enumerate(bounds)}
        results: dict[int, dict] = {}
        t_gen, last = time.perf_counter(), 0.0
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=progress_every_s)
            for ref in done:
                results[pending.pop(ref)] = ray.get(ref)
            now = time.perf_counter()
            if done and (not pending or now - last >= progress_every_s):
                last = now
                ev = sum(r["n_events"] for r in results.values())
                el = now - t_gen
                _log(f"blocks {len(results)}/{n_blocks}  events {ev:,}  {_rate(ev, el)}  elapsed {el:.1f}s")
        del world_ref
        t_tasks = time.perf_counter() - t_gen
        missing = [p for b in range(n_blocks) for split in ("train", "eval")
                   if results[b][f"n_{split}_files"]
                   and not os.path.exists(p := os.path.join(out_abs, "events", split, f"part-{b:05d}.parquet"))]
        if missing:
            raise RuntimeError(
                f"{len(missing)} shard(s) written by Ray tasks are not visible from the driver, e.g. {missing[0]}: "
                f"on a multi-node cluster `out_dir` must be on a filesystem shared by all nodes")

        keys = ("n_events", "n_impressions_shown", "n_clicks", "n_conversions", "n_duplicates_dropped", "n_train_events",
                "n_eval_events", "n_train_files", "n_eval_files")
        tot = {k: int(sum(results[b][k] for b in range(n_blocks))) for k in keys}
        meta = _base_meta(cfg, world, tot)
        meta.update(
            n_train_events=tot["n_train_events"], n_eval_events=tot["n_eval_events"],
            parallel={"n_blocks": n_blocks, "users_per_block": upb, "seed": "SeedSequence(seed, spawn_key=(block,))"},
            shards={"train": tot["n_train_files"], "eval": tot["n_eval_files"]},
        )
        with open(os.path.join(out_dir, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        wall = time.perf_counter() - t0
        _log(f"done: {meta['n_events']:,} events ({meta['n_train_events']:,} train / {meta['n_eval_events']:,} eval) "
             f"in {tot['n_train_files']} + {tot['n_eval_files']} shards, {wall:.1f}s wall ({t_tasks:.1f}s in tasks, "
             f"{_rate(meta['n_events'], t_tasks)}); peak RSS driver {_peak_rss_mb():.0f} MB, "
             f"largest task-worker {max(r['_peak_rss_mb'] for r in results.values()):.0f} MB")
        return meta
    finally:
        if started_ray:
            ray.shutdown()


def main(argv: list[str] | None = None) -> dict:
    """python -m raycg.data.simulate --out DIR [--users N ...]: write a simulated dataset."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=None,
                    help="force the Ray scale-out path (default: by size)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray this starts")
    for f in fields(SimConfig):
        if f.type in ("int", "float"):
            ap.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                            type=int if f.type == "int" else float)
    args = ap.parse_args(argv)
    cfg = SimConfig(**{f.name: getattr(args, f.name) for f in fields(SimConfig)
                       if getattr(args, f.name, None) is not None})
    own_ray = args.num_cpus is not None and use_parallel(cfg, args.parallel)
    if own_ray:
        import ray

        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        t0 = time.perf_counter()
        meta = write_dataset(cfg, args.out, parallel=args.parallel)
        wall = time.perf_counter() - t0
    finally:
        if own_ray:
            ray.shutdown()
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(args.out) for f in fs)
    print(json.dumps({
        "wall_s": round(wall, 1), "n_impressions_shown": meta["n_impressions_shown"], "n_events": meta["n_events"],
        "n_train_events": meta["n_train_events"], "n_eval_events": meta["n_eval_events"],
        "ctr": round(meta["n_clicks"] / meta["n_impressions_shown"], 4),
        "conversion_per_click": round(meta["conversion_per_click"], 4),
        "shards": meta.get("shards", {"train": cfg.num_shards, "eval": max(1, cfg.num_shards // 2)}),
        "bytes_on_disk": size, "driver_peak_rss_mb": round(_peak_rss_mb()),
    }, indent=2), flush=True)
    return meta


if __name__ == "__main__":
    from raycg.data import simulate as _module  # run as raycg.data.simulate so Ray tasks pickle by reference

    _module.main()
