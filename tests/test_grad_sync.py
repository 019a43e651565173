"""`trainer.grad_sync=allreduce`: no DDP wrapper, one all-reduce of the flat dense gradient.

The specification is DDP's: every rank ends the backward pass with the mean over ranks of the
per-rank gradients, and every rank starts from rank 0's parameters.
"""
from __future__ import annotations

import socket

import torch
import torch.multiprocessing as mp
from torch import nn

from raycg.train.optim import DenseGradSync, broadcast_parameters

X = [torch.tensor([[1.0, 2.0], [0.5, -1.0]]), torch.tensor([[3.0, 0.0]])]  # rank 0: 2 rows, rank 1: 1 row
C = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([2.0, 1.0, 1.0])]        # loss = sum(c * (W x + b))


def _rank(rank: int, world: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different initial weights per rank: broadcast_parameters must fix that
    model = nn.ModuleDict({"lin": nn.Linear(2, 3), "unused": nn.Linear(3, 1)})
    broadcast_parameters(model)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    y = model["lin"](X[rank])
    if rank == 0:  # a parameter only one rank uses: the other contributes zeros, as under DDP
        y = y + model["unused"](y).sum()
    (y * C[rank]).sum().backward()
    sync = DenseGradSync(list(model.parameters()))
    sync()
    out[rank] = (start, {k: p.grad.clone() for k, p in model.named_parameters()}, sync.bytes_per_step)
    dist.destroy_process_group()


def test_dense_grad_sync_gives_every_rank_the_mean_gradient_from_the_same_start():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        procs = [ctx.Process(target=_rank, args=(r, 2, port, out)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert all(p.exitcode == 0 for p in procs)
        results = dict(out)
    start0, grads0, moved = results[0]
    start1, grads1, _ = results[1]
    for k in start0:
        assert torch.equal(start0[k], start1[k]), k
    # by hand from rank 0's weights: d/dW sum_rows c.(W x + b) = c x^T summed over rows
    W, b, u = start0["lin.weight"], start0["lin.bias"], start0["unused.weight"]
    g_w = [torch.outer(C[r], X[r].sum(0)) for r in (0, 1)]
    g_b = [C[r] * len(X[r]) for r in (0, 1)]
    # rank 0's extra term: y' = y + s with s = sum_rows u.y_row + n0 u_b added to all n0 x 3 entries,
    # so d loss / d s = n0 * sum(c), and s's gradients are u x^T, n0 u, sum_rows y, n0
    n0 = len(X[0])
    ds = n0 * C[0].sum()
    g_w[0] = g_w[0] + ds * torch.outer(u[0], X[0].sum(0))
    g_b[0] = g_b[0] + ds * n0 * u[0]
    y0 = X[0] @ W.T + b
    g_u = [ds * y0.sum(0)[None], torch.zeros(1, 3)]
    g_ub = [ds * n0 * torch.ones(1), torch.zeros(1)]
    want = {"lin.weight": (g_w[0] + g_w[1]) / 2, "lin.bias": (g_b[0] + g_b[1]) / 2,
            "unused.weight": (g_u[0] + g_u[1]) / 2, "unused.bias": (g_ub[0] + g_ub[1]) / 2}
    for k, g in want.items():
        assert torch.allclose(grads0[k], g, atol=1e-5), k
        assert torch.equal(grads0[k], grads1[k]), k
    assert moved == 4 * (6 + 3 + 3 + 1)
