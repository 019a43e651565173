"""Does Ray Data ingest slow a host-bound training step? Thread vs process ingest, side by side.

A GPU step of the default model is launch-bound: the training thread spends most of a step in
Python and CUDA launches, holding the GIL. This benchmark replaces the GPU step by a step that
holds the GIL for `--step-ms` milliseconds (pure Python) and feeds it, in one run:

    in_memory   packed rows already in memory, sliced into batches (the ceiling)
    thread      raycg.train.feed.device_batches: Ray Data's iterator threads in this process
    process     raycg.train.ingest.ProcessFeed: Ray Data iterates in an actor; this process
                only copies filled shared-memory slots

and prints steps/s and each path's ratio to in_memory. The same code runs in a Ray Train
worker (`trainer.ingest=thread|process`); here the shard is `streaming_split(1)` of the
materialised packed dataset, as Ray Train makes it.

    python benchmarks/ingest_gil.py                           # sim_default-sized data
    python benchmarks/ingest_gil.py --step-ms 2 --batch-size 8192 --transfer-batches 16
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from raycg.config import compose  # noqa: E402
from raycg.data.pipeline import build_feature_store, packed_training_dataset  # noqa: E402
from raycg.data.simulate import SimConfig, write_dataset  # noqa: E402
from raycg.train.feed import ThreadFeed  # noqa: E402
from raycg.train.ingest import ProcessFeed  # noqa: E402
from raycg.train.driver import init_ray  # noqa: E402


def host_step(batch: dict, ms: float) -> float:
    """Hold the GIL for `ms` milliseconds of Python work; touch the batch like a step would."""
    end = time.perf_counter() + ms / 1000
    x = 0
    while time.perf_counter() < end:
        x += sum(range(50))
    return float(batch["signals"][0, 0]) + x * 0


def timed(batches_fn, ms: float, epochs: int) -> tuple[float, int]:
    for i, b in enumerate(batches_fn()):  # warm-up: start the pipeline
        host_step(b, ms)
        if i >= 3:
            break
    steps, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for b in batches_fn():
            host_step(b, ms)
            steps += 1
    return steps / (time.perf_counter() - t0), steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=20000)
    ap.add_argument("--items", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--transfer-batches", type=int, default=8)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--step-ms", type=float, default=3.0)
    ap.add_argument("--history", type=int, default=10, help="history length packed with each row (0 = off)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of the three paths (the machine is noisy)")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()

    data_dir = args.data_dir or os.path.join(tempfile.gettempdir(), f"raycg-bench-{args.users}u-{args.items}i")
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        write_dataset(SimConfig(n_users=args.users, n_items=args.items, n_advertisers=max(args.items // 20, 10)),
                      data_dir)
    train = os.path.join(data_dir, "events", "train")
    init_ray(compose(["ray.num_cpus=2", "ray.include_dashboard=false"]))  # embedded, loopback only (raycg's own start)
    store = build_feature_store(train, os.path.join(data_dir, "items.parquet"), history_length=args.history)
    ds, stats = packed_training_dataset(train, store, materialize=True)
    B, T, P = args.batch_size, args.transfer_batches, args.prefetch

    cols: dict[str, list] = {}
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in b.items():
            cols.setdefault(k, []).append(v)
    mem = {k: torch.from_numpy(np.concatenate(v)) for k, v in cols.items()}
    n = len(mem["signals"])

    def in_memory():
        for s in range(0, n - B + 1, B):
            yield {k: v[s:s + B] for k, v in mem.items()}

    shard = ds.streaming_split(1, equal=True)[0]
    thread = ThreadFeed(shard, B, "cpu", T, P)
    process = ProcessFeed(shard, B, "cpu", T, P)
    results: dict[str, list] = {"in_memory": [], "thread": [], "process": []}
    for r in range(args.repeats):
        for name, fn in (("in_memory", in_memory), ("thread", thread.epoch), ("process", process.epoch)):
            sps, steps = timed(fn, args.step_ms, args.epochs)
            results[name].append(sps)
            print(f"  round {r}: {name:<10} {sps:>8.1f} steps/s ({steps} steps)", flush=True)
    process.close()
    base = float(np.median(results["in_memory"]))
    print(f"\ningest vs a GIL-holding step of {args.step_ms} ms: {stats['rows_used']:,} rows/epoch, batch {B}, "
          f"transfers of {B * T:,} rows, prefetch {P}, {args.epochs} epochs x {args.repeats} rounds, "
          f"{os.cpu_count()} cores (median of rounds)")
    print(f"{'path':<12}{'steps/s':>10}{'rows/s':>12}{'vs in-memory':>14}")
    for name, values in results.items():
        v = float(np.median(values))
        print(f"{name:<12}{v:>10.1f}{v * B:>12,.0f}{v / base:>13.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
