"""`make bench-scale`: a large catalogue through the whole path (issue 11's benchmark).

Simulates (once; cached under data/sim/) --items items and --users users with about
--requests-per-user x 10 impression events each (the simulator's parallel mode above 5M
impressions), trains --epochs epoch(s) through the real pipeline (`raycg.train`'s driver: Ray
Data -> Ray Train; sparse id tables + SparseAdam with the CPU trainer, dense tables with the
compiled GPU trainer, unless model.sparse_tables is given), evaluates on the full corpus, and
measures the step time at this table size against the 10k-item default side by side in this
process (`benchmarks/table_scale.py`'s synthetic step, same batch and device).

    python benchmarks/bench_scale.py                                     # 1M items, 2M users, ~100M events
    python benchmarks/bench_scale.py --users 100000                      # a look on a 2-core machine
    python benchmarks/bench_scale.py trainer=gpu                         # on a GPU host (any Hydra override)

Prints the dataset, training rows/s with the epoch and data-wait times, the peak memory of the
busiest worker (RSS; GPU memory on a GPU), the evaluation time split, and the step-time ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from raycg.config import compose  # noqa: E402
from raycg.eval.evaluate import format_phases  # noqa: E402
from raycg.train.driver import ensure_data, init_ray, resolve_paths, run  # noqa: E402
from table_scale import time_mode  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=2_000_000)
    p.add_argument("--requests-per-user", type=float, default=5.0, help="mean; x 10 impressions per request")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--small-items", type=int, default=10_000, help="the table size the step time is compared with")
    p.add_argument("--step-steps", type=int, default=20, help="timed steps of the side-by-side step comparison")
    p.add_argument("--runs-dir", default=None, help="default: a temporary directory")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the run (e.g. trainer=gpu)")
    a = p.parse_args()
    cfg = compose([
        f"data.sim.n_users={a.users}", f"data.sim.n_items={a.items}",
        f"data.sim.n_advertisers={max(500, a.items // 200)}", "data.sim.n_categories=300",
        f"data.sim.requests_per_user={a.requests_per_user}",
        f"trainer.epochs={a.epochs}", "export=false", "eval.baselines=[popularity]", "run_name=bench_scale",
        f"paths.runs_dir={a.runs_dir or tempfile.mkdtemp(prefix='raycg-bench-scale-')}", *a.overrides])
    if not any(o.startswith("model.sparse_tables=") for o in a.overrides):
        # sparse tables + SparseAdam where the trainer runs eagerly (trainer=cpu); dense tables where it
        # compiles (trainer=gpu): torch.compile cannot differentiate sparse embeddings (preflight)
        cfg.model.sparse_tables = not cfg.trainer.compile
    resolve_paths(cfg)
    init_ray(cfg)
    cached = os.path.exists(os.path.join(cfg.data.dir, "meta.json"))
    t0 = time.perf_counter()
    ensure_data(cfg)  # simulates unless data.dir already holds this dataset
    sim_s = time.perf_counter() - t0
    with open(os.path.join(cfg.data.dir, "meta.json")) as f:
        meta = json.load(f)

    t0 = time.perf_counter()
    results = run(cfg)
    run_s = time.perf_counter() - t0

    # the step alone at both table sizes, side by side (this machine is noisy: compare the ratio)
    device = torch.device("cuda" if cfg.trainer.use_gpu and torch.cuda.is_available() else "cpu")
    mode = ("sparse_adam" if cfg.trainer.table_optimizer == "sparse_adam" else "adagrad") \
        if cfg.model.sparse_tables else "dense"
    step_args = SimpleNamespace(steps=a.step_steps, warmup=3, batch_size=int(cfg.trainer.batch_size))
    small, large = (time_mode(mode, n, step_args, device) for n in (a.small_items, a.items))

    last, sec = results["train_metrics"], results["seconds"]  # Ray Train's result: the last epoch's metrics
    nq = results["n_queries"]
    eval_rest = sec["total"] - sec["search"] - sec["scoring_and_baselines"]
    gpu = f", GPU peak {last['gpu_peak_mb'] / 1024:.1f} GiB" if "gpu_peak_mb" in last else ""
    print(f"\nbench-scale: {a.items:,} items, {a.users:,} users, {meta['n_events']:,} events "
          f"({'cached, checked' if cached else 'simulated'} in {sim_s:.0f}s); device {device}, "
          f"{cfg.trainer.num_workers} worker(s), batch {cfg.trainer.batch_size}, tables: {mode}")
    print(f"train   {last['rows']:,} rows/epoch at {last['rows_per_s']:,.0f} rows/s (epoch {last['epoch_s']:.0f}s, "
          f"waiting for data {last['data_wait_s']:.0f}s); peak RSS of the busiest worker "
          f"{last['peak_rss_mb'] / 1024:.1f} GiB{gpu}")
    print(f"eval    {results['n_items']:,} items x {nq['engagement'] + nq['conversion']:,} queries in "
          f"{sec['total']:.0f}s: embedding + queries + features {eval_rest:.0f}s, exact search {sec['search']:.0f}s, "
          f"baselines + scoring {sec['scoring_and_baselines']:.0f}s; model conv R@100 "
          f"{results['model']['conversion'][100]:.4f}")
    print("eval phases:\n" + format_phases(results))
    print(f"step    {mode} at {a.small_items:,} items {small['ms']:.1f} ms, at {a.items:,} items {large['ms']:.1f} ms: "
          f"{large['ms'] / small['ms']:.2f}x (target <= 1.25x)")
    print(f"total   {sim_s + run_s:.0f}s (simulation {sim_s:.0f}s, train + eval {run_s:.0f}s)")


if __name__ == "__main__":
    main()
