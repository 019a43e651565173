"""The simulator's knobs (`SimConfig`, from Hydra `data.sim.<field>`; docs/simulator.md) and
what its output looks like (the event schema with the attribution column, the format version)."""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from raycg.data.schema import EVENT_SCHEMA, REQUEST_TS

# The simulator writes the attribution column: conversions carry their click's time.
SIM_EVENT_SCHEMA = EVENT_SCHEMA.append(pa.field(REQUEST_TS.name, REQUEST_TS.arrow_type, nullable=False))
# Bumped when the simulator's output changes for the same SimConfig (cached data is re-simulated).
DATA_FORMAT = 2  # 2: request_ts attribution column

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
    # higher-order planted effects (docs/simulator.md; 0 turns each off, as in sim_default)
    order3_strength: float = 0.0  # conversion logit +-s: user segment x item tier x surface (home or not)
    complement_strength: float = 0.0  # related: click and conversion logit +s on the context's complement category
    complement_candidate_frac: float = 0.0  # related: share of impressions from that complement category
    query_advertiser_strength: float = 0.0  # search: conversion logit +-s, one sign per (query, advertiser)
    # brand taste: conversion logit +-s, one sign per (user taste group, advertiser); the group is hidden
    user_advertiser_strength: float = 0.0
    user_taste_groups: int = 8
    popularity_sigma: float = 1.0  # item log-popularity spread: the long tail of items
    activity_sigma: float = 0.8  # user activity (log-normal) spread: the long tail of users
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
