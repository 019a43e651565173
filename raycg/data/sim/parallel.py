"""The scale-out path of `write_dataset`: the world is built once on the driver, requests,
impressions and events are simulated in blocks of `users_per_block` users by Ray tasks, each
seeded by SeedSequence(seed, spawn_key=(block,)) and writing its own shard pair."""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycg.data.datadir import clear_shards, time_split, write_atomic
from raycg.data.sim.config import SimConfig
from raycg.data.sim.events import _simulate_events
from raycg.data.sim.world import _base_meta, _item_user_tables, _make_world
from raycg.logs import get_logger, progress


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
    user_keys = ("n_fav", "fav", "user_vec", "user_segment", "taste_group")
    w = {k: (v[lo:hi] if k in user_keys and v is not None else v) for k, v in world.items()}
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
    get_logger("sim").info(f"sim: {msg}")


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
        # item_cat stays: the complement effect looks up the context item's category in the tasks
        shared = {k: v for k, v in world.items() if k not in ("content", "activity")}
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
        # a bar on a terminal (blocks done, ETA); a log line every progress_every_s seconds either way
        with progress(total=n_blocks, desc="simulating", unit="blocks") as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=progress_every_s)
                for ref in done:
                    results[pending.pop(ref)] = ray.get(ref)
                bar.update(len(done))
                now = time.perf_counter()
                if done and (not pending or now - last >= progress_every_s):
                    last = now
                    ev = sum(r["n_events"] for r in results.values())
                    el = now - t_gen
                    eta = f"  ETA {el / len(results) * len(pending):.0f}s" if pending else ""
                    _log(f"blocks {len(results)}/{n_blocks}  events {ev:,}  {_rate(ev, el)}  elapsed {el:.1f}s"
                         + eta)
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
        tot["planted"] = {name: np.sum([results[b]["planted"][name] for b in range(n_blocks)], axis=0).tolist()
                          for name in results[0]["planted"]}
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
