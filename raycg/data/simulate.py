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

This module puts the simulator together; its parts, by job, are in `raycg.data.sim` (config,
world, events, the Ray scale-out path) and the shard writing in `raycg.data.datadir` (shared
with the log converters).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq

from raycg.data.datadir import clear_shards, time_split, write_shards
from raycg.data.sim.config import SimConfig
from raycg.data.sim.events import _simulate_events
from raycg.data.sim.parallel import _write_dataset_parallel
from raycg.data.sim.world import _base_meta, _item_user_tables, _make_world


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

