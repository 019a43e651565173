"""Step time against id-table size: dense tables + Adam vs sparse tables (`model.sparse_tables`)
+ SparseAdam / Adagrad, side by side in one process (this machine is noisy: compare ratios).

For each catalogue size (items; users = 2 x items), the default model's `train_step` (unified
head, loss=unified, no history) on synthetic packed batches whose ids cover the whole table,
on the CPU or a GPU (`--device cuda`):

    python benchmarks/table_scale.py --items 10000 1000000 --batch-size 1024 --steps 20

Prints ms per step, rows/s, parameters, and each mode's step time at the largest size relative
to its own time at the smallest (the target of issue 11: <= 1.25x from 10k to 1M items).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from raycg.config import compose  # noqa: E402
from raycg.data.spec import FeatureSpec  # noqa: E402
from raycg.model.two_tower import TwoTowerModel  # noqa: E402
from raycg.train.optim import build_optimizer  # noqa: E402
from raycg.train.step import StepContext, train_step  # noqa: E402

MODES = {"dense": (False, None), "sparse_adam": (True, "sparse_adam"), "adagrad": (True, "adagrad")}


def batches(rng, n: int, B: int, items: int, users: int, device) -> list[dict]:
    out = []
    for _ in range(n):
        kind = rng.integers(0, 3, B)
        b = {
            "user_cat": np.stack([rng.integers(0, users, B), rng.integers(0, 3, B), rng.integers(-1, items, B),
                                  rng.integers(-1, 50, B)], axis=1),
            "user_dense": rng.standard_normal((B, 6)).astype(np.float32),
            "item_cat": np.stack([rng.integers(0, items, B), rng.integers(0, 1000, B), rng.integers(0, 50, B)], axis=1),
            "item_dense": rng.standard_normal((B, 10)).astype(np.float32),
            "signals": np.stack([kind == 0, kind == 1, kind == 2, rng.exponential(30, B) * (kind == 1)],
                                axis=1).astype(np.float32),
        }
        out.append({k: torch.as_tensor(np.ascontiguousarray(v)).to(device) for k, v in b.items()})
    return out


def time_mode(mode: str, items: int, args, device) -> dict:
    sparse, table_opt = MODES[mode]
    cfg = compose(["loss=unified", "model.history.length=0", f"model.sparse_tables={str(sparse).lower()}",
                   f"trainer.table_optimizer={table_opt or 'sparse_adam'}"])
    cfg_model = OmegaConf.to_container(cfg.model, resolve=True)
    cfg_model["buckets"] = {"user": 2 * items + 1, "surface": 8, "context_item": items + 1, "query": 51,
                            "item": items + 1, "advertiser": 1001, "category": 51}
    cfg_loss, cfg_train = (OmegaConf.to_container(c, resolve=True) for c in (cfg.loss, cfg.trainer))
    cfg_loss["duration_weighting"] = True  # "auto" is resolved from a real training split
    cfg_loss["log_q_correction"] = False  # the frequency estimator's buckets would add a table-sized cost of their own
    torch.manual_seed(0)
    model = TwoTowerModel(cfg_model, FeatureSpec(user_dense=6, item_dense=10)).to(device)
    opt = build_optimizer(model, cfg_train, device)
    ctx = StepContext(cfg_loss, device=device, seed=0, freq_buckets=items + 1)
    data = batches(np.random.default_rng(0), args.steps + args.warmup, args.batch_size, items, 2 * items, device)
    for b in data[:args.warmup]:
        train_step(model, model, b, opt, ctx)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in data[args.warmup:]:
        loss, _ = train_step(model, model, b, opt, ctx)
    loss = loss.item()
    secs = (time.perf_counter() - t0) / args.steps
    params = sum(p.numel() for p in model.parameters())
    print(f"[table_scale] {mode:<12} {items:>10,} items: {secs * 1e3:8.1f} ms/step, "
          f"{args.batch_size / secs:10,.0f} rows/s, {params / 1e6:6.1f}M parameters, loss {loss:.3f}", flush=True)
    return {"ms": secs * 1e3, "rows_per_s": args.batch_size / secs, "params": params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, nargs="+", default=[10_000, 1_000_000])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    res = {(m, n): time_mode(m, n, args, device) for n in args.items for m in args.modes}
    lo, hi = min(args.items), max(args.items)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nstep time vs table size ({name}; batch {args.batch_size}; users = 2 x items)")
    print(f"{'mode':<13}" + "".join(f"{n:>14,}" for n in args.items) + f"{'ratio':>10}")
    for m in args.modes:
        cells = "".join(f"{res[m, n]['ms']:>11.1f} ms" for n in args.items)
        print(f"{m:<13}{cells}{res[m, hi]['ms'] / res[m, lo]['ms']:>9.2f}x")
    print(f"(ratio = step time at {hi:,} items / at {lo:,}; rows/s at {hi:,}: "
          + ", ".join(f"{m} {res[m, hi]['rows_per_s']:,.0f}" for m in args.modes) + ")")


if __name__ == "__main__":
    main()
