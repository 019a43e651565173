"""train_step variants side by side on the same batches: the loss of every step, the first
non-finite loss and the first non-finite parameter. For a configuration that trains on one
path and not on another (a NaN loss only with CUDA graphs, say): same initial weights, same
batches, one line per variant, no Ray Train in between.

    python benchmarks/gpu_step_check.py --steps 60 data=sim_small trainer.batch_size=512 loss=full \\
        model.heads=multi_head model.history.length=5 trainer.grad_clip_norm=1.0

Variants (name: precision, compile mode): eager-fp32, eager-bf16, compiled-bf16 (default
mode), graphs-bf16 and graphs-fp32 (`reduce-overhead`: CUDA graphs). On a CPU (`--cpu`) only
the eager and default-compiled fp32 ones run.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_train import compose, log, resident_rows, resident_stepper  # noqa: E402

from raycg.train.driver import ensure_data, init_ray, prepare_run, resolve_paths  # noqa: E402

VARIANTS = {  # name: (precision, compiled, compile mode)
    "eager-fp32": ("fp32", False, None), "eager-bf16": ("bf16", False, None),
    "compiled-bf16": ("bf16", True, None), "graphs-bf16": ("bf16", True, "reduce-overhead"),
    "graphs-fp32": ("fp32", True, "reduce-overhead"),
}


def check(cfg, prep, rows, name: str, steps: int, device) -> dict:
    precision, compiled, mode = VARIANTS[name]
    step, model, _ = resident_stepper(cfg, prep, rows, precision, compiled, device, mode, total_steps=steps)
    losses, first_bad_loss, first_bad_param, parts0 = [], None, None, None
    for i in range(steps):
        loss, parts = step(i)
        value = loss.item()  # a sync per step: this is a check, not a timing
        losses.append(value)
        if parts0 is None:
            parts0 = {k: round(v.item(), 4) for k, v in parts.items()}
        if first_bad_loss is None and not math.isfinite(value):
            first_bad_loss = i
        if first_bad_param is None:
            bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
            if bad:
                first_bad_param = (i, bad[:6])
        if first_bad_loss is not None and first_bad_param is not None:
            break
    return {"losses": losses, "first_bad_loss": first_bad_loss, "first_bad_param": first_bad_param, "parts0": parts0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--cpu", action="store_true", help="eager-fp32 and compiled default on the CPU")
    p.add_argument("--out", default="/tmp/raycg-step-check")
    p.add_argument("overrides", nargs="*", help="Hydra overrides (the configuration under test)")
    args = p.parse_args()
    device = torch.device("cpu" if args.cpu else "cuda")
    variants = ["eager-fp32", "compiled-bf16"] if args.cpu else args.variants
    base = [f"data.dir={args.out}/data", f"paths.runs_dir={args.out}/runs", "ray.num_cpus=2", *args.overrides]
    cfg = compose(base + ["run_name=step-check"])
    resolve_paths(cfg)
    init_ray(cfg)
    ensure_data(cfg)
    prep = prepare_run(cfg)
    rows = resident_rows(prep, device)
    if device.type == "cuda" and cfg.trainer.tf32:
        torch.set_float32_matmul_precision("high")
    results = {}
    for name in variants:
        if args.cpu and name == "compiled-bf16":
            VARIANTS[name] = ("fp32", True, None)
        try:
            results[name] = check(cfg, prep, rows, name, args.steps, device)
        except Exception as e:  # noqa: BLE001 - report and go on with the next variant
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        r = results[name]
        log(f"[check] {name}: " + (r["error"] if "error" in r else
            f"first non-finite loss at step {r['first_bad_loss']}, parameter {r['first_bad_param']}; step 0 parts {r['parts0']}; "
            f"losses {' '.join(f'{v:.3f}' for v in r['losses'][:8])} ... {r['losses'][-1]:.3f}"))
    log(f"\nstep check: {len(rows['signals']):,} rows, batch {cfg.trainer.batch_size}, {args.steps} steps, "
        f"{torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}")
    log(f"{'variant':<16}{'step 0':>10}{'step 5':>10}{'last':>10}  first non-finite (loss / parameter)")
    for name, r in results.items():
        if "error" in r:
            log(f"{name:<16}  FAILED {r['error'][:80]}")
            continue
        L = r["losses"]
        log(f"{name:<16}{L[0]:>10.4f}{L[min(5, len(L) - 1)]:>10.4f}{L[-1]:>10.4f}  "
            f"{r['first_bad_loss']} / {r['first_bad_param']}")


if __name__ == "__main__":
    main()
