"""The feature-store pass: per-id event counts (users, items, context items, queries) of a
training split, the first and longest step of a run's data preparation at scale (116-122 s of
~180 s at 2M users / 253M events on the lent H100 machine). Two implementations side by side in
one process, on the same Ray dataset, alternating (this machine is noisy: compare the ratio):

    numpy_sort   the previous one: 64k-row map batches, np.unique + np.add.at per key, the
                 driver concatenates every partial row and sorts them once per key
    arrow_hash   raycg.data.features.aggregate_counts_by: whole-block map batches, Arrow's
                 hash aggregation in the tasks and on the driver, compacted as rows arrive

Both results are checked equal. Usage:

    python benchmarks/feature_counts.py --users 200000 --items 100000    # 10x sim_crossed, ~30M events
    python benchmarks/feature_counts.py --data-dir /path/to/data          # an existing data directory
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pyarrow.compute as pc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from raycg.config import compose  # noqa: E402
from raycg.data.features import COUNT_KINDS, aggregate_counts_by, kind_indicators  # noqa: E402
from raycg.data.pipeline import read_events, validation_cutoff  # noqa: E402
from raycg.train.driver import ensure_data, init_ray  # noqa: E402

KEYS = ["item_id", "user_id", "context_item_id", "query_id"]


def numpy_sort_counts(ds, keys, before_ts):
    """The implementation before arrow_hash (raycg 2026-12-07), kept here as the baseline."""
    def partial(t, key, kinds):
        ids = t.column(key).to_numpy().astype(np.int64)
        uniq, inv = np.unique(ids, return_inverse=True)
        counts = np.zeros((len(uniq), len(COUNT_KINDS)), dtype=np.int64)
        np.add.at(counts, inv, kinds)
        return {"id": uniq, "counts": counts}

    def counts(t):
        if before_ts is not None:
            t = t.filter(pc.less(t.column("timestamp"), before_ts))
        kinds = np.stack([a.to_numpy() for a in kind_indicators(t).values()], axis=1)
        parts = [partial(t, k, kinds) for k in keys]
        return {"key": np.concatenate([np.full(len(p["id"]), i, np.int64) for i, p in enumerate(parts)]),
                "id": np.concatenate([p["id"] for p in parts]),
                "counts": np.concatenate([p["counts"] for p in parts])}

    per_key = {k: [] for k in keys}
    for b in ds.map_batches(counts, batch_format="pyarrow", batch_size=65536).iter_batches(
            batch_size=None, batch_format="numpy"):
        for i, k in enumerate(keys):
            mine = b["key"] == i
            per_key[k].append((b["id"][mine], b["counts"][mine]))
    out = {}
    for k, parts in per_key.items():
        ids = np.concatenate([p[0] for p in parts])
        uniq, inv = np.unique(ids, return_inverse=True)
        total = np.zeros((len(uniq), len(COUNT_KINDS)), dtype=np.int64)
        np.add.at(total, inv, np.concatenate([p[1] for p in parts]))
        out[k] = (uniq, total)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--data-dir", default=None, help="an existing data directory (default: simulate sim_crossed)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes of each implementation, alternating")
    a = p.parse_args()
    overrides = ["data=sim_crossed", f"data.sim.n_users={a.users}", f"data.sim.n_items={a.items}",
                 f"data.sim.n_advertisers={max(1, a.users // 10)}"]
    if a.data_dir:
        overrides.append(f"data.dir={os.path.abspath(a.data_dir)}")
    cfg = compose(overrides)
    init_ray(cfg)
    ensure_data(cfg)
    before = validation_cutoff(cfg.data.train_path, cfg.data.validation_fraction)
    ds, rows = read_events(cfg.data.train_path)
    print(f"[feature_counts] {cfg.data.train_path}: {rows:,} training-split events, keys {KEYS}", flush=True)
    impls = {"numpy_sort": numpy_sort_counts, "arrow_hash": aggregate_counts_by}
    seconds = {name: [] for name in impls}
    results = {}
    for r in range(a.repeats):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            results[name] = fn(ds, KEYS, before)
            seconds[name].append(time.perf_counter() - t0)
            print(f"[feature_counts] pass {r + 1} {name}: {seconds[name][-1]:.1f}s", flush=True)
    for k in KEYS:
        (ia, ca), (ib, cb) = results["numpy_sort"][k], results["arrow_hash"][k]
        if not (np.array_equal(ia, ib) and np.array_equal(ca, cb)):
            raise SystemExit(f"FAILED: {k} counts differ between the implementations")
    distinct = ", ".join(f"{k} {len(results['arrow_hash'][k][0]):,}" for k in KEYS)
    print(f"\nsame counts from both ({distinct} distinct ids)")
    print(f"{'implementation':<14} {'best s':>8} {'mean s':>8} {'events/s':>14} {'vs numpy_sort':>14}")
    base = min(seconds["numpy_sort"])
    for name, s in seconds.items():
        print(f"{name:<14} {min(s):>8.1f} {np.mean(s):>8.1f} {rows / min(s):>14,.0f} {base / min(s):>13.2f}x")


if __name__ == "__main__":
    main()
