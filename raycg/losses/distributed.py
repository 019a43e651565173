"""Cross-worker negatives: all-gather item embeddings across DDP ranks, with exact gradients.

With W ranks each holding b rows, rank r scores its b users against all W*b positives:

    gathered = [x_0; x_1; ...; x_{W-1}]                 [W*b, ...]   (rank order)
    L_r      = (1/b) sum_{i in rank r} w_i CE_i(u_i; all W*b positives)

Gradient. The single-process loss over the whole global batch is L = (1/W) sum_r L_r (a mean over
W*b rows). Rank r's own positives x_r appear in EVERY rank's loss, so dL/dx_r needs the terms
from the other ranks too. `gather_with_grad` therefore treats the other ranks' slices as
constants in the forward pass (no autograd path to another process), and in the backward pass
all-reduces (sums) the gradient of the gathered tensor over ranks and hands the local slice to
x_r: rank r receives sum_{r'} dL_{r'}/dx_r. DDP then averages parameter gradients over ranks,
giving (1/W) grad(sum_r L_r) = grad L: exactly the single-process gradient of the global batch.
(Keeping only the local slice's own gradient, without the backward all-reduce, silently drops
every cross-rank term: tests/test_cross_worker.py checks that this differs.)

All ranks must call it with the same shape (equal b; use drop_last), and every rank must run
the backward (it is a collective). Without torch.distributed initialised it returns x.
The backward uses all_reduce (works on gloo and nccl); reduce_scatter would move less data.

Example (2 ranks, b=1): rank 0 has x=[1.], rank 1 has x=[2.] -> both get [1., 2.].
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        ctx.rank, ctx.b = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.b:(ctx.rank + 1) * ctx.b]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather [b, ...] from every rank into [world*b, ...] (rank order); see module docstring.

    Tensors that do not require grad (ids, log q) are gathered without the autograd node.
    """
    rank, world = _world()
    if world == 1:
        return x
    if x.requires_grad:
        return _GatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def gather_cross_worker_candidates(
    item_emb: torch.Tensor, item_ids: torch.Tensor, item_log_q: torch.Tensor | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The OTHER ranks' positives, as (cand_emb, cand_ids, cand_log_q) for sampled_softmax_loss.

    The local positives stay the loss's in-batch block (so row i's target is column i); the
    other ranks' (W-1)*b positives become the shared extra candidates. Returns Nones when not
    distributed (the loss then uses in-batch negatives only).
    """
    rank, world = _world()
    if world == 1:
        return None, None, None
    b = item_emb.shape[0]

    def others(t):  # static slices, not a boolean mask: no data-dependent shape
        if t is None:
            return None
        g = gather_with_grad(t)
        return torch.cat([g[: rank * b], g[(rank + 1) * b:]])

    return others(item_emb), others(item_ids), others(item_log_q)
