"""Learning-rate schedule: linear warm-up, then constant, cosine or linear decay.

For optimiser step s (0-based), W warm-up steps, N total steps and floor r = min_lr_ratio,
the learning rate is lr * f(s) with

    warm-up (s < W):   f = (s + 1) / W
    constant:          f = 1
    cosine:            f = r + (1 - r) * (1 + cos(pi * p)) / 2,   p = min(1, (s - W) / (N - W))
    linear:            f = r + (1 - r) * (1 - p)

Example: W=2, N=6, cosine, r=0 -> f = 0.5, 1, 1, 0.854, 0.5, 0.146.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

DECAYS = ("constant", "cosine", "linear")


def lr_factor(decay: str, warmup_steps: int, total_steps: int | None, min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    """f(step) of the module docstring."""
    if decay not in DECAYS:
        raise ValueError(f"trainer.lr_schedule.decay={decay!r}: expected one of {list(DECAYS)}")
    if warmup_steps < 0:
        raise ValueError(f"trainer.lr_schedule.warmup_steps={warmup_steps}: must be >= 0")
    if decay != "constant" and (total_steps is None or total_steps <= warmup_steps):
        raise ValueError(f"trainer.lr_schedule.decay={decay} needs total_steps > warmup_steps "
                         f"(got total_steps={total_steps}, warmup_steps={warmup_steps})")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"trainer.lr_schedule.min_lr_ratio={min_lr_ratio}: must be in [0, 1]")

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        p = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        shape = (1 + math.cos(math.pi * p)) / 2 if decay == "cosine" else 1 - p
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict, total_steps: int | None):
    """LambdaLR from `trainer.lr_schedule` ({decay, warmup_steps, min_lr_ratio, total_steps});
    `total_steps` (epochs x steps per epoch) is used when the config leaves it null. For
    `Optimizers` (sparse tables), the same schedule for each of its optimisers."""
    from raycg.train.optim import Optimizers, Schedulers

    factor = lr_factor(cfg["decay"], int(cfg["warmup_steps"]), cfg["total_steps"] or total_steps,
                       float(cfg["min_lr_ratio"]))
    if isinstance(optimizer, Optimizers):
        return Schedulers({k: torch.optim.lr_scheduler.LambdaLR(o, factor) for k, o in optimizer.optimizers.items()})
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
