"""Cross-worker negatives on 2 gloo processes == one process on the concatenated batch.

Each rank holds half of a global batch of 2b rows, embeds it with a DDP-wrapped shared-weight
two-tower model, gathers the other rank's positives (gather_with_grad) as shared candidates and
computes sampled_softmax_loss for its b users. The mean of the two per-rank losses and the
DDP-averaged gradients must equal the loss and gradients of a single process whose rows each
see all 2b positives (same hard negatives, logQ, accidental-hit masking).

Why it is exact: L_single = (1/2b) sum_i CE_i = (L_0 + L_1) / 2. gather_with_grad's backward sums
the gathered gradient over ranks, so rank r's positives receive d(L_0 + L_1)/dv_r; DDP averages
the parameter gradients over the 2 ranks: (1/2) grad(L_0 + L_1) = grad L_single.
"""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from raycg.losses.distributed import gather_cross_worker_candidates, gather_with_grad
from raycg.losses.frequency import StreamingFrequencyEstimator
from raycg.losses.softmax import sampled_softmax_loss

WORLD, B_LOCAL, H, D_IN, D = 2, 4, 2, 5, 3


class TwoTower(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.user = nn.Parameter(torch.randn(D_IN, D, generator=g, dtype=torch.float64))
        self.item = nn.Parameter(torch.randn(D_IN, D, generator=g, dtype=torch.float64))
        self.log_t = nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))

    def forward(self, xu, xi, xh):
        norm = nn.functional.normalize
        return norm(xu @ self.user, dim=-1), norm(xi @ self.item, dim=-1), norm(xh @ self.item, dim=-1), self.log_t.exp()


def global_batch():
    g = torch.Generator().manual_seed(1)
    n = WORLD * B_LOCAL
    return dict(
        xu=torch.randn(n, D_IN, generator=g, dtype=torch.float64),
        xi=torch.randn(n, D_IN, generator=g, dtype=torch.float64),
        xh=torch.randn(n, H, D_IN, generator=g, dtype=torch.float64),
        # id 3 repeats inside rank 0 and across ranks; id 9 across ranks
        ids=torch.tensor([3, 3, 9, 4, 3, 5, 6, 9]),
        hard_ids=torch.tensor([[11, -1], [12, 13], [5, 14], [15, -1], [16, 17], [3, -1], [18, 19], [20, 21]]),
        w=torch.tensor([1.0, 0.5, 2.0, 0.0, 1.0, 1.5, 0.7, 1.0], dtype=torch.float64),
        log_q=torch.log(torch.rand(n, generator=g, dtype=torch.float64) * 0.5 + 0.01),
    )


def loss_on(model, bt, sl, cross_worker: str):
    """cross_worker: "none" (single process: in-batch over rows sl), "grad" or "constant"."""
    u, v, h, temp = model(bt["xu"][sl], bt["xi"][sl], bt["xh"][sl])
    ids, lq = bt["ids"][sl], bt["log_q"][sl]
    if cross_worker == "grad":
        cand, cand_ids, cand_lq = gather_cross_worker_candidates(v, ids, lq)
    elif cross_worker == "constant":           # the naive gather: other ranks' part without gradient
        rank = dist.get_rank()
        parts = [torch.empty_like(v) for _ in range(WORLD)]
        dist.all_gather(parts, v.detach())
        others = [r for r in range(WORLD) if r != rank]
        cand = torch.cat([parts[r] for r in others])
        cand_ids = torch.cat([bt["ids"][r * B_LOCAL:(r + 1) * B_LOCAL] for r in others])
        cand_lq = torch.cat([bt["log_q"][r * B_LOCAL:(r + 1) * B_LOCAL] for r in others])
    else:
        cand = cand_ids = cand_lq = None
    return sampled_softmax_loss(u, v, ids, bt["w"][sl], temp, cand_emb=cand, cand_ids=cand_ids,
                                hard_emb=h, hard_ids=bt["hard_ids"][sl], pos_log_q=lq, cand_log_q=cand_lq)


LOSS_CFG = {"conversion_weight": 1.0, "engagement_weight": 1.0, "duration_weighting": True, "t_max": 60.0,
            "mask_accidental_hits": True, "log_q_correction": False, "cross_worker_negatives": False,
            "advertiser_weight": 0.0, "advertiser_block_rows": None}
M = 3  # mixed negatives: the same draws on both ranks, so one process can see the same candidate set


class TwoHeads(nn.Module):
    """Engagement and conversion heads on both towers (the multi-head design)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.w = nn.ParameterDict({f"{tower}_{head}": nn.Parameter(torch.randn(D_IN, D, generator=g, dtype=torch.float64))
                                   for tower in ("user", "item") for head in ("engagement", "conversion")})
        self.log_t = nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))

    def forward(self, xu, xi):
        norm = nn.functional.normalize
        user = {h: norm(xu @ self.w[f"user_{h}"], dim=-1) for h in ("engagement", "conversion")}
        item = {h: norm(xi @ self.w[f"item_{h}"], dim=-1) for h in ("engagement", "conversion")}
        return user, item, self.log_t.exp()


def composed_loss(model, bt, sl, cross_worker: bool, **cfg):
    """raycg.losses.objective.training_loss: both heads, task weights from packed signals, mixed
    negatives appended to the item side (as StepContext.extra_items does), cross-worker on/off."""
    from raycg.losses.objective import Candidates, training_loss

    xi = torch.cat([bt["xi"][sl], bt["xm"]])
    user, item_all, temp = model(bt["xu"][sl], xi)
    n = len(bt["xu"][sl])
    item = {h: v[:n] for h, v in item_all.items()}
    extra = Candidates(mixed={h: v[n:] for h, v in item_all.items()}, mixed_ids=bt["mixed_ids"], mixed_log_q=0.0)
    batch = {"signals": bt["signals"][sl], "item_cat": torch.stack([bt["ids"][sl], bt["ids"][sl] % 3], dim=1)}
    loss, _ = training_loss(user, item, batch, dict(LOSS_CFG, cross_worker_negatives=cross_worker, **cfg), temp, extra,
                            serve_head="conversion")
    return loss


def loss_batch():
    bt = global_batch()
    g = torch.Generator().manual_seed(3)
    n = WORLD * B_LOCAL
    kind = torch.tensor([0, 1, 2, 1, 0, 1, 2, 0])  # conversion, click, save
    bt["signals"] = torch.stack([kind == 0, kind == 1, kind == 2, torch.rand(n, generator=g) * 90 * (kind == 1)],
                                dim=1).to(torch.float64)
    bt["xm"] = torch.randn(M, D_IN, generator=g, dtype=torch.float64)
    bt["mixed_ids"] = torch.tensor([9, 30, 31])  # 9 is a positive of both ranks: an accidental hit
    return bt


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    bt = global_batch()
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    result = {}

    # gather_with_grad itself: rank order, gradient = sum over ranks of d(loss)/d(local slice)
    x = torch.full((2, 1), float(rank + 1), requires_grad=True)
    g = gather_with_grad(x)
    result["gathered"] = g.detach().clone()
    (g * torch.arange(1.0, 5.0)[:, None] * (rank + 1)).sum().backward()
    result["x_grad"] = x.grad.clone()

    for mode in ("grad", "constant"):
        model = TwoTower()
        ddp = nn.parallel.DistributedDataParallel(model)
        loss = loss_on(ddp, bt, sl, mode)
        loss.backward()                         # DDP averages the gradients over ranks
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        result[mode] = {"loss": mean_loss / WORLD, **{n: p.grad.clone() for n, p in model.named_parameters()}}

    # the composed objective: two heads + mixed negatives + cross-worker negatives
    model = TwoHeads()
    ddp = nn.parallel.DistributedDataParallel(model)
    loss = composed_loss(ddp, loss_batch(), sl, cross_worker=True)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    result["composed"] = {"loss": mean_loss / WORLD, **{n: p.grad.clone() for n, p in model.named_parameters()}}

    # + the advertiser softmax, which each rank computes over its own rows' advertisers
    model = TwoHeads()
    ddp = nn.parallel.DistributedDataParallel(model)
    loss = composed_loss(ddp, loss_batch(), sl, cross_worker=True, advertiser_weight=0.5)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    result["composed_adv"] = {"loss": mean_loss / WORLD, **{n: p.grad.clone() for n, p in model.named_parameters()}}

    # frequency estimator: global ids, identical state on all ranks; rank 1 has fewer ids
    est = StreamingFrequencyEstimator(16, alpha=0.5)
    for step in (1, 2, 4):
        local = bt["ids"][sl] if rank == 0 else bt["ids"][sl][: step % 3 + 1]
        est.update_global(local + step, step)
    result["freq"] = {k: v.clone() for k, v in est.state_dict().items()}
    # the training loop's path: equal sizes on every rank, one gather, no size exchange
    est = StreamingFrequencyEstimator(16, alpha=0.5)
    for step in (1, 2, 4):
        est.update_global(bt["ids"][sl] * step, step, same_size=True)
    result["freq_same_size"] = {k: v.clone() for k, v in est.state_dict().items()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    # torch 2.13 + gloo: when rank 0 (the TCPStore host) exits first, rank 1 sometimes aborts in
    # a C++ destructor at interpreter teardown ("terminate called without an active exception"),
    # after its result is saved. Skip the teardown; everything above has finished.
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cross_worker"))
    ctx = mp.start_processes(_worker, args=(free_port(), out), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.time() + 120
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("cross-worker processes did not finish in 120 s")
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]


def single_process():
    bt = global_batch()
    model = TwoTower()
    loss = loss_on(model, bt, slice(None), "none")
    loss.backward()
    return {"loss": loss.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()}}


def test_gather_with_grad_order_and_gradient(ranks):
    for r, res in enumerate(ranks):
        assert torch.equal(res["gathered"], torch.tensor([[1.0], [1.0], [2.0], [2.0]]))
        # rank r' contributes (r'+1) * [1,2,3,4]; rows of rank r get the sum over r' = 3 * [..]
        assert torch.equal(res["x_grad"], 3 * torch.tensor([[1.0 + 2 * r], [2.0 + 2 * r]]))


def test_cross_worker_loss_and_gradients_equal_single_process(ranks):
    want = single_process()
    for res in ranks:
        got = res["grad"]
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0)
            torch.testing.assert_close(got[k], want[k], atol=1e-10, rtol=1e-10)   # float64: exact


def test_composed_objective_with_both_heads_and_mixed_negatives_equals_single_process(ranks):
    """training_loss itself (not only sampled_softmax_loss): multi-head, task weights,
    mixed negatives and cross-worker negatives on 2 ranks == one process on the whole batch."""
    model = TwoHeads()
    loss = composed_loss(model, loss_batch(), slice(None), cross_worker=False)
    loss.backward()
    want = {"loss": loss.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()}}
    for res in ranks:
        got = res["composed"]
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-10, rtol=1e-10)   # float64: exact
    assert want["w.user_engagement"].abs().sum() > 0 and want["w.item_conversion"].abs().sum() > 0


def test_advertiser_loss_per_worker_equals_one_process_with_blocks_of_the_worker_batch(ranks):
    """The advertiser softmax is per worker: 2 ranks of b rows == one process with
    loss.advertiser_block_rows = b, and != one process whose softmax sees all 2b rows."""
    def single(**cfg):
        model = TwoHeads()
        loss = composed_loss(model, loss_batch(), slice(None), cross_worker=False, advertiser_weight=0.5, **cfg)
        loss.backward()
        return {"loss": loss.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()}}

    blocks, whole = single(advertiser_block_rows=B_LOCAL), single()
    for res in ranks:
        got = res["composed_adv"]
        for k in blocks:
            torch.testing.assert_close(got[k], blocks[k], atol=1e-10, rtol=1e-10)   # float64: exact
    assert abs(whole["loss"] - blocks["loss"]) > 1e-3
    # the advertiser term is there: without it the loss is the plain composed one
    assert abs(ranks[0]["composed_adv"]["loss"] - ranks[0]["composed"]["loss"]) > 1e-3


def test_constant_gather_drops_cross_rank_gradient_terms(ranks):
    want = single_process()
    naive = ranks[0]["constant"]
    torch.testing.assert_close(naive["loss"], want["loss"], atol=1e-10, rtol=0)   # same loss value ...
    assert (naive["item"] - want["item"]).abs().max() > 1e-3                      # ... wrong item gradient


def test_update_global_keeps_estimators_identical(ranks):
    bt = global_batch()
    ref = StreamingFrequencyEstimator(16, alpha=0.5)
    for step in (1, 2, 4):
        ids = torch.cat([bt["ids"][:B_LOCAL], bt["ids"][B_LOCAL:][: step % 3 + 1]])
        ref.update(ids + step, step)
    for res in ranks:
        assert torch.equal(res["freq"]["A"], ref.A) and torch.equal(res["freq"]["B"], ref.B)
    ref = StreamingFrequencyEstimator(16, alpha=0.5)
    for step in (1, 2, 4):
        ref.update(bt["ids"] * step, step)
    for res in ranks:
        assert torch.equal(res["freq_same_size"]["A"], ref.A) and torch.equal(res["freq_same_size"]["B"], ref.B)


def test_no_op_without_process_group():
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x
    assert gather_cross_worker_candidates(x, torch.arange(3)) == (None, None, None)
