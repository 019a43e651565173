"""Ingest benchmark: how fast does Ray Data feed the real two-tower training step?

Measures rows/s of the *same* training step (raycg.train.step.train_step: forward, loss,
backward, Adam) fed four ways, side by side in one run:

    in_memory            packed tensors already in memory (the ceiling)
    ray_packed_mat       Ray Data: read -> map_batches(pack) -> materialize -> iter_torch_batches
    ray_packed_stream    the same without materialize (decode + pack streamed every epoch)
    ray_pack_on_trainer  Ray Data read -> iter_batches(pyarrow); pack in the training loop

The batch is the default feature set (no history sequence), unnormalised dense inputs.

and prints each one's ratio to in_memory. Usage:

    python benchmarks/ingest.py                       # sim_small-sized data, 3 epochs
    python benchmarks/ingest.py --users 20000 --items 10000 --epochs 3 --batch-size 1024
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import ray
import torch
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from raycg.config import compose  # noqa: E402
from raycg.data.batches import pack_events  # noqa: E402
from raycg.data.spec import FeatureSpec  # noqa: E402
from raycg.data.pipeline import auto_buckets, build_feature_store, packed_training_dataset, read_events  # noqa: E402
from raycg.data.simulate import SimConfig, write_dataset  # noqa: E402
from raycg.model.two_tower import TwoTowerModel  # noqa: E402
from raycg.train.step import StepContext, train_step  # noqa: E402
from raycg.train.driver import init_ray  # noqa: E402


def load_cfg():
    # the default model and loss (raycg/conf/model/parallel_dcn.yaml, raycg/conf/loss/unified.yaml);
    # duration_weighting=auto resolves to true on simulated data (its clicks have durations)
    cfg = compose(["loss.duration_weighting=true"])
    return (OmegaConf.to_container(c, resolve=True) for c in (cfg.model, cfg.loss))


def fresh_model(model_cfg, spec, seed=0):
    torch.manual_seed(seed)
    model = TwoTowerModel(model_cfg, spec)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def timed_epochs(batches_fn, model_cfg, loss_cfg, spec, epochs, warmup_steps=5):
    """rows/s over `epochs` passes (after a few warm-up steps on the first batches)."""
    model, opt = fresh_model(model_cfg, spec)
    ctx = StepContext(loss_cfg, freq_buckets=model_cfg["buckets"]["item"])
    for i, batch in enumerate(batches_fn()):
        train_step(model, model, batch, opt, ctx)
        if i + 1 >= warmup_steps:
            break
    rows, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in batches_fn():
            train_step(model, model, batch, opt, ctx)
            rows += len(batch["signals"])
    return rows / (time.perf_counter() - t0), rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--requests-per-user", type=float, default=15)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the step (a Train worker has 1)")
    ap.add_argument("--data-dir", default=None, help="reuse/create the simulated data here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    data_dir = args.data_dir or os.path.join(tempfile.gettempdir(), f"raycg-bench-{args.users}u-{args.items}i")
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        write_dataset(SimConfig(n_users=args.users, n_items=args.items, n_advertisers=max(args.items // 20, 10),
                                n_categories=30, requests_per_user=args.requests_per_user), data_dir)
    train_path = os.path.join(data_dir, "events", "train")
    model_cfg, loss_cfg = load_cfg()

    init_ray(compose(["ray.num_cpus=2", "ray.include_dashboard=false"]))  # embedded, loopback only (raycg's own start)
    B = args.batch_size

    store = build_feature_store(train_path, os.path.join(data_dir, "items.parquet"))
    model_cfg["buckets"] = auto_buckets(model_cfg["buckets"], model_cfg["max_buckets"], train_path, store.items)
    mat_ds, stats = packed_training_dataset(train_path, store, materialize=True)
    stream_ds, _ = packed_training_dataset(train_path, store, materialize=False)
    raw_ds, _ = read_events(train_path)

    # in-memory ceiling: the same packed rows as torch tensors, sliced into batches
    cols = {k: [] for k in ("user_cat", "user_dense", "item_cat", "item_dense", "signals")}
    for b in mat_ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k in cols:
            cols[k].append(b[k])
    mem = {k: torch.from_numpy(np.concatenate(v)) for k, v in cols.items()}
    n = len(mem["signals"])
    spec = FeatureSpec(user_dense=mem["user_dense"].shape[1], item_dense=mem["item_dense"].shape[1])

    def in_memory():
        for s in range(0, n - B + 1, B):
            yield {k: v[s:s + B] for k, v in mem.items()}

    def ray_packed(ds):
        return lambda: ds.iter_torch_batches(batch_size=B, drop_last=True, prefetch_batches=2)

    def pack_on_trainer():
        buf = None
        for tbl in raw_ds.iter_batches(batch_size=B * 4, batch_format="pyarrow", prefetch_batches=2):
            packed = {k: torch.from_numpy(v) for k, v in pack_events(tbl, store).items()}
            buf = packed if buf is None else {k: torch.cat([buf[k], packed[k]]) for k in packed}
            while len(buf["signals"]) >= B:
                yield {k: v[:B] for k, v in buf.items()}
                buf = {k: v[B:] for k, v in buf.items()}

    results = {}
    for name, fn in [("in_memory", in_memory), ("ray_packed_mat", ray_packed(mat_ds)),
                     ("ray_packed_stream", ray_packed(stream_ds)), ("ray_pack_on_trainer", pack_on_trainer),
                     ("in_memory_again", in_memory)]:
        rps, rows = timed_epochs(fn, model_cfg, loss_cfg, spec, args.epochs)
        results[name] = rps
        print(f"  {name:<20} {rps:>10,.0f} rows/s  ({rows:,} rows)", flush=True)

    base = (results["in_memory"] + results["in_memory_again"]) / 2
    print(f"\ningest benchmark: {stats['rows_used']:,} training rows/epoch (of {stats['rows_read']:,} events), "
          f"batch {B}, {args.epochs} epochs, torch threads {args.threads}, {os.cpu_count()} cores")
    print(f"{'path':<22}{'rows/s':>12}{'vs in-memory':>14}")
    for name in ("in_memory", "ray_packed_mat", "ray_packed_stream", "ray_pack_on_trainer"):
        value = base if name == "in_memory" else results[name]
        print(f"{name:<22}{value:>12,.0f}{value / base:>13.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
