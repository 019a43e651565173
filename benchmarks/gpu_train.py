"""GPU training throughput: the limit vs the real Ray path, and 1 vs N GPU workers, in one run.

For each model variant (history feature off / on; the default model has it on):

    resident  the project's own `train_step` on packed rows already in GPU memory, in this
              process, no Ray: eager fp32, eager bf16 and compiled bf16 (the limit)
    ray xN    `raycg.train trainer=gpu` as it runs: the materialised Ray dataset streamed to N
              Ray Train workers (one per GPU, NCCL), rows/s from each epoch's own metrics
              (median of the epochs after the first, which includes compilation)

and prints rows/s, the real path's share of the limit and the N-worker scaling ratio, with
cross-worker negatives on (the default) and, for N > 1, off. With --profile, a torch.profiler
table of the resident compiled step (time per named range and the top kernels) goes to --out.

    python benchmarks/gpu_train.py --users 200000 --workers 1 2 --out /tmp/gpu_bench

Data: the simulator's scale-out (`--users` x 15 requests x 10 impressions events, about 7%
of them positives, the packed training rows), simulated in parallel Ray tasks.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time

import torch
from omegaconf import OmegaConf, open_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from raycg.config import compose  # noqa: E402,F401  (gpu_step_check.py imports it from here)
from raycg.losses.objective import EAGER, LossKernels  # noqa: E402
from raycg.model.two_tower import TwoTowerModel  # noqa: E402
from raycg.train.driver import ensure_data, init_ray, make_trainer, prepare_run, resolve_paths  # noqa: E402
from raycg.train.optim import build_optimizer  # noqa: E402
from raycg.train.schedule import build_scheduler  # noqa: E402
from raycg.train.step import StepContext, train_step  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def resident_rows(prep, device) -> dict[str, torch.Tensor]:
    """The whole packed training set in GPU memory (one tensor per packed column)."""
    parts: dict[str, list] = {}
    for b in prep.dataset.iter_torch_batches(batch_size=1 << 18, device=device):
        for k, v in b.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def resident_stepper(cfg, prep, rows: dict, precision: str, compiled: bool, device: torch.device,
                     mode: str | None = None, total_steps: int | None = None):
    """(step(i), model, n_steps): `train_step` on full batch i (mod n_steps) of the resident rows,
    built as `raycg.train` builds it (same seed -> same initial weights for every variant)."""
    B = cfg.trainer.batch_size
    n_steps = len(rows["signals"]) // B
    model_cfg, loss_cfg = (OmegaConf.to_container(c, resolve=True) for c in (cfg.model, cfg.loss))
    torch.manual_seed(cfg.seed)
    model = TwoTowerModel(model_cfg, prep.spec)
    if prep.store.vocab:
        model.set_vocabularies(prep.store.vocab)
    model = model.to(device)
    opt = build_optimizer(model, OmegaConf.to_container(cfg.trainer), device)
    schedule = OmegaConf.to_container(cfg.trainer.lr_schedule)
    # a warm-up longer than a small (smoke-size) run would leave the decay no steps
    sched = build_scheduler(opt, schedule, total_steps=max(total_steps or n_steps, 2 * int(schedule["warmup_steps"])))
    needs_corpus = loss_cfg["mixed_negatives"] > 0 or loss_cfg["hard_negatives"] > 0
    ctx = StepContext(loss_cfg, prep.store.items if needs_corpus else None, device=device, seed=cfg.seed,
                      freq_buckets=model_cfg["buckets"]["item"], precision=precision,
                      grad_clip_norm=cfg.trainer.grad_clip_norm,
                      # as raycg.train.loop: the loss kernels are not CUDA-graphed
                      kernels=LossKernels.compiled(None if mode == "reduce-overhead" else mode) if compiled else EAGER)
    forward = torch.compile(model, dynamic=False, mode=mode) if compiled else model
    graphs = compiled and mode == "reduce-overhead"

    def step(i):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        s = (i % n_steps) * B
        return train_step(forward, model, {k: v[s:s + B] for k, v in rows.items()}, opt, ctx, sched)

    return step, model, n_steps


def resident_run(cfg, prep, rows: dict, precision: str, compiled: bool, warmup: int, device: torch.device,
                 profile_dir: str | None = None, mode: str | None = None):
    """rows/s of train_step over every full batch of the resident rows (after `warmup` steps)."""
    B = cfg.trainer.batch_size
    step, _, n_steps = resident_stepper(cfg, prep, rows, precision, compiled, device, mode,
                                        total_steps=len(rows["signals"]) // B + warmup)

    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync(device)
    warm_s = time.perf_counter() - t0
    if profile_dir:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(20):
                step(i)
            sync(device)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
        with open(os.path.join(profile_dir, f"profile_resident_{mode or 'default'}.txt"), "w") as f:
            f.write(table)
        log(table[:6000])
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    for i in range(n_steps):
        loss, _ = step(i)
        loss_sum += loss
    loss = loss_sum / n_steps
    secs = time.perf_counter() - t0
    log(f"[bench] resident {precision}{' compiled ' + (mode or 'default') if compiled else ''}: {n_steps} steps of {B}, "
        f"{n_steps * B / secs:,.0f} rows/s (warm-up {warmup} steps {warm_s:.1f}s), loss {loss.item():.4f}")
    return n_steps * B / secs


def ray_run(cfg, prep, workers: int, cross_worker: bool, name: str, mode: str | None, extra=()) -> dict:
    """`raycg.train trainer=gpu` on `workers` GPUs over the prepared dataset; per-epoch metrics."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.trainer.num_workers = workers
        cfg.loss.cross_worker_negatives = cross_worker
        cfg.trainer.compile_mode = mode
        cfg.run_name = name
        for item in extra:  # e.g. trainer.transfer_batches=64
            key, value = item.split("=", 1)
            OmegaConf.update(cfg, key, type(OmegaConf.select(cfg, key))(value))
    run_prep = dataclasses.replace(prep, run_dir=os.path.join(cfg.paths.runs_dir, name))
    os.makedirs(run_prep.run_dir, exist_ok=True)
    t0 = time.perf_counter()
    log(f"[bench] {name} starts at {time.strftime('%H:%M:%S')}")
    make_trainer(cfg, run_prep).fit()
    log(f"[bench] {name} ends at {time.strftime('%H:%M:%S')}")
    wall = time.perf_counter() - t0
    with open(os.path.join(run_prep.run_dir, "metrics.jsonl")) as f:
        epochs = [json.loads(line) for line in f]
    later = epochs[1:] or epochs
    out = {"workers": workers, "cross_worker": cross_worker, "mode": mode or "default", "rows_per_s": statistics.median(m["rows_per_s"] for m in later),
           "epoch_s": [round(m["epoch_s"], 2) for m in epochs], "data_wait_s": [round(m["data_wait_s"], 2) for m in epochs],
           "rows_per_epoch": epochs[0]["rows"], "fit_wall_s": wall, "loss": [round(m["loss"], 4) for m in epochs]}
    log(f"[bench] ray x{workers} cross_worker={cross_worker} compile {mode or 'default'}: {out['rows_per_s']:,.0f} rows/s "
        f"(epochs {out['epoch_s']} s, data wait {out['data_wait_s']} s, {out['rows_per_epoch']:,} rows/epoch, "
        f"loss {out['loss']})")
    return out


def attempt(fn, label: str):
    """Run one measurement; on failure log it and return the error text (the others still run)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a benchmark reports what failed and goes on
        import traceback

        traceback.print_exc()
        log(f"[bench] {label} FAILED: {type(e).__name__}: {str(e)[:300]}")
        return f"{type(e).__name__}: {str(e)[:300]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts (default: 1 and all GPUs)")
    p.add_argument("--history", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--eager", action="store_true", help="also time the eager fp32 / bf16 resident steps")
    p.add_argument("--no-cross-worker-off", action="store_true", help="skip the N>1 runs without cross-worker negatives")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of the resident compiled step")
    p.add_argument("--modes", nargs="+", default=["default"], help="torch.compile modes for the resident step")
    p.add_argument("--ray-modes", nargs="+", default=["default"], help="torch.compile modes for the Ray runs")
    p.add_argument("--grad-syncs", nargs="+", default=["ddp", "allreduce"], choices=["ddp", "allreduce"],
                   help="trainer.grad_sync values for the N>1 runs")
    p.add_argument("--resident-only", action="store_true")
    p.add_argument("--no-resident", action="store_true", help="only the Ray runs (no limit column)")
    p.add_argument("--ray-variant", action="append", default=[],
                   help="extra 1-worker Ray run: NAME:key=value,key=value (e.g. big:trainer.transfer_batches=64)")
    p.add_argument("--out", default="/tmp/raycg-gpu-bench")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run every code path on the CPU (tiny sizes, no timing value): a check before GPU time")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    gpus = torch.cuda.device_count()
    if gpus == 0 and not args.cpu_smoke:
        raise SystemExit("gpu_train.py needs CUDA (or --cpu-smoke)")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    workers = args.workers or sorted({1, max(gpus, 1)})
    base = ["trainer=gpu", f"trainer.batch_size={args.batch_size}", f"trainer.epochs={args.epochs}",
            f"data.sim.n_users={args.users}",
            f"data.dir={args.out}/data", f"paths.runs_dir={args.out}/runs", "trainer.checkpoints_to_keep=1",
            *args.overrides]
    if args.cpu_smoke:
        base += ["trainer.use_gpu=false", "trainer.cpus_per_worker=0.45", "trainer.compile=false",
                 "trainer.precision=fp32", "ray.num_cpus=2",
                 "trainer.lr_schedule.warmup_steps=2"]  # a smoke run has tens of steps, not the default warm-up
    cfg = compose(base)
    resolve_paths(cfg)
    init_ray(cfg)
    t0 = time.perf_counter()
    ensure_data(cfg)
    name = torch.cuda.get_device_name(0) if gpus else "CPU (smoke)"
    log(f"[bench] data ready in {time.perf_counter() - t0:.1f}s; {gpus} x {name}")
    results = {"gpu": name, "gpus": gpus, "args": vars(args), "variants": {}}
    for hist in args.history:
        overrides = base + (["model.history.length=0"] if hist == "off" else [])
        cfg = compose(overrides + [f"run_name=prep-history-{hist}"])
        resolve_paths(cfg)
        prep = prepare_run(cfg)
        res = {"rows": prep.stats["rows_used"], "resident": {}, "ray": []}
        rows = resident_rows(prep, device)
        variants = ([("fp32", False, None), ("bf16", False, None)] if args.eager else [])
        variants += [("bf16", True, None if m == "default" else m) for m in args.modes if not args.no_resident]
        for precision, compiled, mode in variants:
            key = f"{precision}{'_compiled_' + (mode or 'default') if compiled else ''}"
            if args.cpu_smoke:
                precision, compiled = "fp32", False
            res["resident"][key] = attempt(lambda: resident_run(
                cfg, prep, rows, precision, compiled, args.warmup, device,
                args.out if (args.profile and hist == "on" and compiled) else None, mode), key)
        del rows
        if gpus:
            torch.cuda.empty_cache()
        if not args.resident_only:
            for mode in args.ray_modes:
                m = None if mode == "default" else mode
                for n in workers:
                    for xw in ([True] if n == 1 or args.no_cross_worker_off else [False, True]):
                        for gs in (["ddp"] if n == 1 else args.grad_syncs):
                            name = f"bench-h{hist}-w{n}-xw{int(xw)}-{mode}-{gs}"
                            r = attempt(lambda: ray_run(cfg, prep, n, xw, name, m, [f"trainer.grad_sync={gs}"]), name)
                            res["ray"].append({**r, "grad_sync": gs} if isinstance(r, dict) else
                                              {"workers": n, "cross_worker": xw, "mode": mode, "grad_sync": gs,
                                               "error": r})
            for spec in args.ray_variant:
                vname, _, items = spec.partition(":")
                m = None if args.ray_modes[0] == "default" else args.ray_modes[0]
                r = attempt(lambda: ray_run(cfg, prep, 1, True, f"bench-h{hist}-{vname}", m, items.split(",")), vname)
                res["ray"].append({**r, "variant": vname} if isinstance(r, dict) else
                                  {"workers": 1, "cross_worker": True, "mode": vname, "error": r})
        results["variants"][hist] = res
        with open(os.path.join(args.out, "gpu_train.json"), "w") as f:
            json.dump(results, f, indent=2)

    lines = [f"\nGPU training throughput, {gpus} x {results['gpu']}, batch {args.batch_size} per worker "
             f"(rows/s; real path = Ray Data -> Ray Train, `raycg.train trainer=gpu`)",
             f"{'history':<8}{'path':<48}{'rows/s':>12}{'vs limit':>10}{'vs 1 GPU':>10}"]
    for hist, res in results["variants"].items():
        timed = {k: v for k, v in res["resident"].items() if isinstance(v, float)}
        limit = max((v for k, v in timed.items() if "compiled" in k), default=max(timed.values(), default=float("nan")))
        for key, v in res["resident"].items():
            cells = f"{v:>12,.0f}{v / limit:>10.2f}" if isinstance(v, float) else f"  FAILED: {v[:60]}"
            lines.append(f"{hist:<8}{'resident ' + key:<48}{cells}")
        ok = [r for r in res["ray"] if "error" not in r]
        for r in res["ray"]:
            label = (f"ray x{r['workers']} GPU, compile {r['mode']}{', ' + r['variant'] if 'variant' in r else ''}"
                     f"{'' if r['cross_worker'] else ', no cross-worker neg.'}"
                     f"{', grads ' + r['grad_sync'] if r['workers'] > 1 else ''}")
            if "error" in r:
                lines.append(f"{hist:<8}{label:<48}  FAILED: {r['error'][:60]}")
                continue
            one = next((o["rows_per_s"] for o in ok if o["workers"] == 1 and o["mode"] == r["mode"]), float("nan"))
            lines.append(f"{hist:<8}{label:<48}{r['rows_per_s']:>12,.0f}{r['rows_per_s'] / r['workers'] / limit:>10.2f}"
                         f"{r['rows_per_s'] / one:>10.2f}")
    per_epoch = ", ".join(f"history {h}: {r['rows']:,}" for h, r in results["variants"].items())
    lines.append(f"(packed rows per epoch: {per_epoch}; limit = fastest resident compiled step; "
                 "'vs limit' for N GPUs is per GPU)")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "gpu_train.txt"), "w") as f:
        f.write(table + "\n")
    log(table)


if __name__ == "__main__":
    main()
