"""Streaming item-frequency estimation for the logQ correction (Yi et al., RecSys 2019, Alg. 2).

Items are hashed into `num_buckets` buckets, h(y) = y mod num_buckets. Two arrays:

    A[h]  the last training step at which bucket h was seen           (-1: never)
    B[h]  moving average of the gap (in steps) between its sightings  (0: no gap measured yet)

At step t, for every DISTINCT bucket h in the batch (duplicates within a batch count once):

    B[h] <- (1 - alpha) * B[h] + alpha * (t - A[h])      if h was seen before
    A[h] <- t
    q(y)  = 1 / B[h(y)]

What q means: the probability that an item appears (at least once) in the batch of one
training step, i.e. q_i = 1 - (1 - p_i)^b for b draws per step with per-example probability p_i
(~ b * p_i for rare items). For the logQ correction only ratios of q between candidates
matter, so per-step vs per-example scale is irrelevant for rare items; for in-batch negatives
the per-step presence probability is exactly the chance that the item is a candidate.

Two deliberate details beyond the paper's pseudo-code:
  * the first measured gap initialises B[h] directly (instead of blending into an arbitrary
    initial constant), so the estimate has no initialisation bias to forget;
  * buckets with no measured gap yet (never seen, or seen once) get q = 1 / default_gap,
    default_gap = num_buckets by default: "rarer than a uniform item of a num_buckets corpus".
Steps must increase between calls (pass the global optimiser step).

Distributed (DDP): every rank must call `update` with the same GLOBAL batch ids (all ranks'
ids) and the same global step, so the estimators stay identical on all ranks without ever
syncing their state; `update_global` does the all-gather. A and B are registered buffers, so
they are part of state_dict() and of checkpoints.

Example (alpha=0.5): bucket seen at steps 1, 3, 4 -> gaps 2, 1 -> B = 2, then 0.5*2 + 0.5*1 = 1.5,
q = 1/1.5.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class StreamingFrequencyEstimator(nn.Module):
    """Hashed streaming estimate of each item's per-step sampling probability (module docstring)."""

    A: torch.Tensor
    B: torch.Tensor

    def __init__(self, num_buckets: int, alpha: float = 0.01, default_gap: float | None = None):
        super().__init__()
        if num_buckets <= 0:
            raise ValueError(f"num_buckets must be > 0, got {num_buckets}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.num_buckets = int(num_buckets)
        self.alpha = float(alpha)
        self.default_gap = float(default_gap if default_gap is not None else num_buckets)
        self.register_buffer("A", torch.full((self.num_buckets,), -1, dtype=torch.int64))
        self.register_buffer("B", torch.zeros(self.num_buckets, dtype=torch.float64))

    def bucket(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.remainder(ids.to(device=self.A.device, dtype=torch.int64), self.num_buckets)

    @torch.no_grad()
    def update(self, ids: torch.Tensor, step: int) -> None:
        """Record that `ids` (any shape; duplicates count once) were in the batch of `step`.

        Duplicates need no `torch.unique` (whose output shape depends on the data and would
        synchronise with the host): every copy of a bucket reads the same old A[h], B[h] and
        so writes the same new value.
        """
        h = self.bucket(ids.reshape(-1))
        if h.numel() == 0:
            return
        last = self.A[h]
        seen = last >= 0
        gap = (step - last).to(self.B.dtype)
        old = self.B[h]
        blended = torch.where(old > 0, (1.0 - self.alpha) * old + self.alpha * gap, gap)
        self.B[h] = torch.where(seen, blended, old)
        self.A.index_fill_(0, h, step)  # a scalar kernel argument: `A[h] = step` would copy it from the host

    @torch.no_grad()
    def update_global(self, ids: torch.Tensor, step: int, same_size: bool = False) -> None:
        """`update` with the ids of ALL ranks (all-gathered) when torch.distributed is initialised.

        Every rank must call it at the same steps (it is a collective). With `same_size=True`
        (every rank passes the same number of ids, as training with drop_last does) the ids are
        gathered in one collective with no host synchronisation; otherwise ranks may hold
        different numbers of ids: sizes are exchanged first, then ids padded and trimmed.
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ids = ids.reshape(-1).to(torch.int64).contiguous()
            world = dist.get_world_size()
            if same_size:
                parts = [torch.empty_like(ids) for _ in range(world)]
                dist.all_gather(parts, ids)
                ids = torch.cat(parts)
            else:
                n = torch.tensor([ids.numel()], dtype=torch.int64, device=ids.device)
                sizes = [torch.empty_like(n) for _ in range(world)]
                dist.all_gather(sizes, n)
                sizes = [int(s) for s in sizes]
                padded = torch.zeros(max(sizes), dtype=torch.int64, device=ids.device)
                padded[: ids.numel()] = ids
                parts = [torch.empty_like(padded) for _ in range(world)]
                dist.all_gather(parts, padded)
                ids = torch.cat([p[:s] for p, s in zip(parts, sizes)])
        self.update(ids, step)

    @torch.no_grad()
    def log_q(self, ids: torch.Tensor) -> torch.Tensor:
        """log q(y) for ids of any shape (float32, on the buffers' device); see module docstring."""
        gap = self.B[self.bucket(ids)]
        gap = torch.where(gap > 0, gap, torch.full_like(gap, self.default_gap))
        return (-torch.log(gap)).to(torch.float32)

    def extra_repr(self) -> str:
        return f"num_buckets={self.num_buckets}, alpha={self.alpha}, default_gap={self.default_gap}"
