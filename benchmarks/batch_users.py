"""How many of a training batch's in-batch negatives are the same user's other positives?

In-batch negatives are the other rows' items; a row of the same user carries one of that
user's own positives, an unmasked false negative. How often that happens depends on how
rows reach the batches: this script builds a run's packed training set exactly as
`python -m raycg.train <overrides>` does (raycg.train.driver.prepare_run), splits it over
trainer.num_workers as Ray Train does (streaming_split, equal shards, in order), reads every
step's global batch (trainer.num_workers x trainer.batch_size rows: with
loss.cross_worker_negatives every rank scores the global batch) and prints, per row, the
mean number of OTHER rows of the same user in its batch, for the data.shuffle setting given
and for a global random permutation of the same rows (the floor a perfect shuffle gives).

    python benchmarks/batch_users.py data=sim_crossed data.sim.n_users=200000 \\
        data.sim.n_items=100000 data.sim.n_advertisers=20000 trainer.num_workers=1 \\
        trainer.batch_size=8192 data.shuffle=none

Measured on the 2-core box (2026-12-08, 10x simulator, 2.45M training rows in 20 files of
10,000 users; the scale-out simulator shuffles rows within a file only):

    workers x batch   data.shuffle=none    data.shuffle=once    global permutation
    1 x 8192          2.887                0.149                0.149
    2 x 4096          1.972                0.149                0.148
    2 x 1024          0.498                0.038                0.037
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from raycg.config import compose  # noqa: E402
from raycg.train.driver import ensure_data, init_ray, prepare_run, resolve_paths  # noqa: E402


def same_user_rows(batches: list[np.ndarray]) -> tuple[float, float]:
    """(mean other rows of the same user per row, share of rows with at least one) over batches."""
    other, share = [], []
    for users in batches:
        _, inverse, counts = np.unique(users, return_inverse=True, return_counts=True)
        c = counts[inverse] - 1
        other.append(c.mean())
        share.append((c > 0).mean())
    return float(np.mean(other)), float(np.mean(share))


def step_batches(dataset, workers: int, batch_size: int) -> list[np.ndarray]:
    """The user ids of every step's global batch: rank k's batch s, concatenated over ranks."""
    splits = dataset.streaming_split(workers, equal=True) if workers > 1 else [dataset.iterator()]
    users: list[list[np.ndarray]] = [[] for _ in range(workers)]

    def consume(k: int) -> None:  # every split must be read at once (streaming_split)
        for b in splits[k].iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True):
            users[k].append(b["user_cat"][:, 0].copy())

    threads = [threading.Thread(target=consume, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    steps = min(len(u) for u in users)
    return [np.concatenate([users[k][s] for k in range(workers)]) for s in range(steps)]


def main(overrides: list[str]) -> None:
    cfg = compose(["trainer.deterministic=true", f"paths.runs_dir={tempfile.mkdtemp(prefix='raycg-batch-users-')}",
                   "run_name=batch_users", *overrides])
    resolve_paths(cfg)
    init_ray(cfg)
    ensure_data(cfg)
    t0 = time.perf_counter()
    prep = prepare_run(cfg)
    prep_s = time.perf_counter() - t0
    workers, batch_size = int(cfg.trainer.num_workers), int(cfg.trainer.batch_size)
    t0 = time.perf_counter()
    batches = step_batches(prep.dataset, workers, batch_size)
    epoch_s = time.perf_counter() - t0
    rows = np.concatenate(batches)
    permuted = np.random.default_rng(0).permutation(rows)
    floor = [permuted[s * len(batches[0]):(s + 1) * len(batches[0])] for s in range(len(batches))]
    got, floor_ = same_user_rows(batches), same_user_rows(floor)
    print(f"data.shuffle={cfg.data.shuffle}, {workers} x {batch_size}, {len(batches)} steps "
          f"(data preparation {prep_s:.0f}s, one pass {epoch_s:.0f}s)")
    print(f"  other rows of the same user per row: {got[0]:.3f} (rows with one: {got[1]:.3f}); "
          f"global permutation {floor_[0]:.3f} ({floor_[1]:.3f}); ratio {got[0] / floor_[0]:.1f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
