"""Sparse id tables (`model.sparse_tables`): the same model, updates that touch only looked-up
rows, and DDP synchronisation that moves only those rows (raycg/train/optim.py)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from raycg.model.two_tower import TwoTowerModel
from raycg.train.optim import Optimizers, SparseGradSync, build_optimizer, sparse_tables
from raycg.train.schedule import build_scheduler
from raycg.train.step import StepContext, train_step
from test_train_step import configs, corpus, packed_batch, spec


def model_pair(**trainer):
    """(dense model, sparse-table model with the same weights, their optimizers, contexts)."""
    out = []
    for sparse in (False, True):
        cfg_model, cfg_loss, cfg_train = configs(f"model.sparse_tables={str(sparse).lower()}")
        cfg_train.update(trainer)
        torch.manual_seed(0)
        model = TwoTowerModel(cfg_model, spec())
        if out:
            model.load_state_dict(out[0][0].state_dict())
        ctx = StepContext(cfg_loss, corpus(np.random.default_rng(0)), seed=0,
                          freq_buckets=cfg_model["buckets"]["item"])
        out.append((model, build_optimizer(model, cfg_train, torch.device("cpu")), ctx))
    return out


def test_sparse_tables_give_the_dense_models_loss_and_gradients():
    (dense, opt_d, ctx_d), (sparse, opt_s, ctx_s) = model_pair()
    assert isinstance(opt_s, Optimizers) and isinstance(opt_d, torch.optim.Adam)
    tables = sparse_tables(sparse)
    # every id table of both towers and the history encoder's own ones; the shared item table once
    assert len(tables) == len(sparse.user_tower.embeddings) + len(sparse.item_tower.embeddings)
    items = corpus(np.random.default_rng(0))
    batch = packed_batch(np.random.default_rng(1), items, "cpu")
    loss_d, _ = train_step(dense, dense, batch, opt_d, ctx_d)
    loss_s, _ = train_step(sparse, sparse, batch, opt_s, ctx_s)
    assert loss_s.item() == pytest.approx(loss_d.item(), rel=1e-6)
    dense_params = dict(dense.named_parameters())
    for name, p in sparse.named_parameters():
        want = dense_params[name].grad
        if name in tables:
            assert p.grad.is_sparse, name
            got = p.grad.to_dense()
            assert got[0].abs().max().item() == 0.0, f"{name}: the missing-id row 0 got a gradient"
            assert (got.abs().sum(dim=1) > 0).sum().item() > 1
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-7), name
        else:
            assert not p.grad.is_sparse
            assert torch.allclose(p.grad, want, rtol=1e-4, atol=1e-7), name


def test_gradient_clipping_leaves_the_sparse_tables_out():
    (_, _, ctx_d), (sparse, opt_s, ctx_s) = model_pair()
    ctx_s.grad_clip_norm = 1e-3
    batch = packed_batch(np.random.default_rng(1), corpus(np.random.default_rng(0)), "cpu")
    train_step(sparse, sparse, batch, opt_s, ctx_s)
    dense_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in ctx_s.clip_params]))
    assert dense_norm.item() == pytest.approx(1e-3, rel=1e-3)
    assert {id(p) for p in ctx_s.clip_params}.isdisjoint(id(p) for p in sparse_tables(sparse).values())


def test_sparse_adam_first_update_is_adams_on_the_looked_up_rows_and_leaves_the_others():
    """Golden values from Adam's formula: on a row's first update m_hat = g, v_hat = g^2, so
    w <- w - lr * g / (|g| + eps), with g the row's summed gradient."""
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3, sparse=True)
    w0 = emb.weight.detach().clone()
    opt = torch.optim.SparseAdam([emb.weight], lr=0.1, eps=1e-8)
    ids = torch.tensor([2, 5, 2])
    coef = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.0, -1.0], [2.0, 1.0, 0.5]])
    (emb(ids) * coef).sum().backward()
    opt.step()
    g = torch.zeros(10, 3)
    g.index_add_(0, ids, coef)
    want = w0 - 0.1 * g / (g.abs() + 1e-8)
    assert torch.allclose(emb.weight.detach(), want, atol=1e-6)
    untouched = [i for i in range(10) if i not in (2, 5)]
    assert torch.equal(emb.weight.detach()[untouched], w0[untouched])
    # lazy: a second step on other rows leaves rows 2 and 5 where dense Adam's momentum would move them
    after_first = emb.weight.detach().clone()
    opt.zero_grad()
    emb(torch.tensor([7])).sum().backward()
    opt.step()
    assert torch.equal(emb.weight.detach()[[2, 5]], after_first[[2, 5]])


def test_sparse_adagrad_equals_dense_adagrad_on_every_row_at_every_step():
    torch.manual_seed(0)
    dense, sparse = nn.Embedding(12, 4), nn.Embedding(12, 4, sparse=True)
    sparse.load_state_dict(dense.state_dict())
    opt_d = torch.optim.Adagrad(dense.parameters(), lr=0.05)
    opt_s = torch.optim.Adagrad(sparse.parameters(), lr=0.05)
    w0 = dense.weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        ids = torch.randint(0, 6, (5,), generator=g)  # rows 6..11 are never looked up
        coef = torch.randn(5, 4, generator=g)
        for emb, opt in ((dense, opt_d), (sparse, opt_s)):
            opt.zero_grad()
            (emb(ids) * coef).sum().backward()
            opt.step()
        assert torch.allclose(sparse.weight, dense.weight, atol=1e-6)
    assert torch.equal(sparse.weight.detach()[6:], w0[6:])


def test_optimizers_and_schedules_round_trip_and_refuse_a_dense_state():
    (dense, opt_d, _), (sparse, opt_s, _) = model_pair(lr_schedule={"decay": "linear", "warmup_steps": 0,
                                                                    "min_lr_ratio": 0.0, "total_steps": 4})
    sched = build_scheduler(opt_s, {"decay": "linear", "warmup_steps": 0, "min_lr_ratio": 0.0, "total_steps": None},
                            total_steps=4)
    sched.step()
    lrs = sched.get_last_lr()
    assert len(lrs) == len(opt_s.param_groups) == 2 and lrs[0] == lrs[1] == pytest.approx(0.75 * opt_s.param_groups[0]["initial_lr"])
    state = opt_s.state_dict()
    again = build_optimizer(sparse, configs("model.sparse_tables=true")[2], torch.device("cpu"))
    again.load_state_dict(state)
    with pytest.raises(ValueError, match="sparse_tables changed"):
        again.load_state_dict(opt_d.state_dict())


def _ddp_rank(rank: int, world: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    emb = nn.Embedding(20, 3, sparse=True)
    ids = torch.tensor([[1, 4, 4], [4, 9]][rank])  # unequal counts: rank 1 is padded to 3 pairs
    coef = torch.tensor([1.0, 2.0][rank])
    (emb(ids) * coef).sum().backward()
    sync = SparseGradSync({"weight": emb.weight})
    sync()
    out[rank] = (emb.weight.grad.to_dense(), sync.bytes_per_step)
    dist.destroy_process_group()


def test_sparse_grad_sync_averages_the_ranks_rows_and_moves_only_them():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        procs = [ctx.Process(target=_ddp_rank, args=(r, 2, port, out)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert all(p.exitcode == 0 for p in procs)
        results = dict(out)
    want = torch.zeros(20, 3)
    for ids, c in (([1, 4, 4], 1.0), ([4, 9], 2.0)):  # d(sum(c * emb(ids)))/dW, averaged over 2 ranks
        for i in ids:
            want[i] += c / 2
    for rank in (0, 1):
        grad, moved = results[rank]
        assert torch.equal(grad, want)
        assert moved == 2 * 3 * (8 + 3 * 4) + 2 * 8  # world x max pairs x (int64 index + dim fp32) + counts


def test_two_ddp_workers_train_sparse_tables_resume_and_evaluate(ray_session, tiny_data_dir, tmp_path):
    """The real loop: 2 Ray Train workers (gloo DDP) leave the tables to SparseGradSync, which
    moves at most world x lookups x (8 + 4 x id_dim) bytes per table and step; the item table
    is shared with the history encoder (two gradients per step); the run evaluates and exports.
    (Resuming the two optimizers' state: test_sparse_tables_resume_as_if_never_stopped.)

    It is also the end-to-end run of the design no other end-to-end test trains (see
    test_variants.py): a multi-head model (served by its conversion head) on the
    cross-only structure, through Ray Train, evaluation and export."""
    import json
    import math

    from conftest import compose, tiny_overrides
    from raycg.model import checkpoint as ckpt_io
    from raycg.train.driver import run

    overrides = [*tiny_overrides(tiny_data_dir), f"paths.runs_dir={tmp_path}", "run_name=s",
                 "model.sparse_tables=true", "trainer.table_optimizer=adagrad", "trainer.num_workers=2",
                 "trainer.batch_size=128", "model.history.length=4", "eval.ks=[10,100]", "eval.baselines=[]",
                 "trainer.early_stopping.patience=0", "model.cross=cross_only", "model.heads=multi_head",
                 "logger=tensorboard", "trainer.log_every_steps=2"]
    results = run(compose(overrides + ["trainer.epochs=2"]))
    run_dir = tmp_path / "s"
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1] and all(math.isfinite(m["loss"]) for m in metrics)
    model, config = ckpt_io.load_model(ckpt_io.newest_intact(str(run_dir)))
    tables = sparse_tables(model)
    id_dim = model.item_tower.embeddings[0].emb.embedding_dim
    per_rank_batch = metrics[1]["rows"] // metrics[1]["steps"] // 2
    # every table is looked up once per row, the item table also for 4 history positions (shared)
    lookups = (len(tables) + 4) * per_rank_batch
    assert len(tables) * 2 * (8 + 4 * id_dim) < metrics[1]["table_sync_bytes_per_step"]
    assert metrics[1]["table_sync_bytes_per_step"] <= 2 * lookups * (8 + 4 * id_dim) + len(tables) * 2 * 8
    for task in ("conversion", "engagement"):
        assert results["n_queries"][task] > 0
        assert 0.0 <= results["model"][task][10] <= results["model"][task][100] <= 1.0
    # the workers trained the configured design; evaluation and export read it back from the checkpoint
    assert config["model"]["cross"] == "cross_only" and config["model"]["heads"] == "multi_head"
    assert model.serve_head == "conversion" and model.user_tower.body.structure == "cross_only"
    assert json.loads((run_dir / "export" / "feature_spec.json").read_text())["serve_head"] == "conversion"
    export = run_dir / "export"  # the driver's export: towers, item index and its measured recall, a retriever
    index = json.loads((export / "index.json").read_text())
    assert index["kind"] == "flat" and index["recall"]["n_queries"] > 0 and index["recall"]["value"] == 1.0
    from raycg.retrieve import Retriever

    assert len(Retriever(str(export)).retrieve(user_id=1, surface="home", k=5)[0]) == 5
    # logger=tensorboard: rank 0's curves and epochs and the driver's config and evaluation
    from test_tracking import read_events

    events = sorted(os.listdir(run_dir / "tensorboard"))
    assert [e.rsplit(".", 1)[1] for e in events] == ["driver", "worker"]  # one worker file: rank 0 only
    scalars, texts = read_events(str(run_dir / "tensorboard"))
    steps = metrics[1]["steps"]
    assert [s for s, _ in scalars["epoch/loss"]] == [steps, 2 * steps]
    assert [v for _, v in scalars["epoch/loss"]] == pytest.approx([m["loss"] for m in metrics])
    assert [v for _, v in scalars["epoch/val_mean_recall"]] == pytest.approx([m["val_mean_recall"] for m in metrics])
    assert len(scalars["train/loss"]) == 2 * (steps // 2) and "train/loss_conversion" in scalars
    assert scalars["eval/model/conversion_recall_at_10"][0][1] == pytest.approx(results["model"]["conversion"][10])
    assert "model.cross = cross_only" in texts["config/text_summary"]


@pytest.mark.parametrize("table_optimizer", ["sparse_adam", "adagrad"])
def test_sparse_tables_resume_as_if_never_stopped(tmp_path, table_optimizer):
    """Checkpointed after 2 steps and restored as the training loop restores a run (model,
    both optimizers, step state), the third step lands where 3 uninterrupted steps do."""
    from raycg.model import checkpoint as ckpt_io

    cfg_model, cfg_loss, cfg_train = configs("model.sparse_tables=true", f"trainer.table_optimizer={table_optimizer}")
    items = corpus(np.random.default_rng(0))
    batches = [packed_batch(np.random.default_rng(s), items, "cpu") for s in (1, 2, 3)]

    def fresh(seed):
        torch.manual_seed(seed)
        model = TwoTowerModel(cfg_model, spec())
        ctx = StepContext(cfg_loss, items, seed=0, freq_buckets=cfg_model["buckets"]["item"])
        return model, build_optimizer(model, cfg_train, torch.device("cpu")), ctx

    def step(model, opt, ctx, i):
        torch.manual_seed(100 + i)  # dropout draws: the same for both paths
        train_step(model, model, batches[i], opt, ctx)

    model, opt, ctx = fresh(0)
    for i in range(3):
        step(model, opt, ctx, i)
    stopped, opt_s, ctx_s = fresh(0)
    for i in range(2):
        step(stopped, opt_s, ctx_s, i)
    ckpt_io.save(str(tmp_path), stopped, opt_s, 0, {"model": cfg_model}, spec().to_dict(),
                 step_state=ctx_s.state_dict())
    state = ckpt_io.load_state(str(tmp_path))
    resumed, opt_r, ctx_r = fresh(1)  # other initial weights: everything must come from the checkpoint
    resumed.load_state_dict(state["model"])
    opt_r.load_state_dict(state["optimizer"])
    ctx_r.load_state_dict(state)
    assert isinstance(opt_r, Optimizers) and set(opt_r.optimizers) == {"dense", "tables"}
    step(resumed, opt_r, ctx_r, 2)
    for (name, want), got in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(want, got), name
    assert ctx_r.step == ctx.step == 3


def test_model_card_lists_each_table_with_its_bytes_and_optimizer_state():
    from raycg.model.card import id_tables, model_card

    cfg_sparse = configs("model.sparse_tables=true")[0]
    model = TwoTowerModel(cfg_sparse, spec())
    d = cfg_sparse["id_dim"]
    tables = {t["name"]: t for t in id_tables(model, "adagrad")}
    # tables over 64 rows: user 101, context_item 302, item 302 (shared with the history encoder: once)
    assert set(tables) == {"user_tower.embeddings.0", "user_tower.embeddings.2", "item_tower.embeddings.0"}
    item = tables["item_tower.embeddings.0"]
    assert (item["rows"], item["bytes"], item["optimizer"]) == (302, 302 * d * 4, "adagrad")
    assert item["state_bytes"] == item["bytes"]  # Adagrad: one sum per value
    dense = {t["name"]: t for t in id_tables(TwoTowerModel(configs()[0], spec()))}
    assert dense["item_tower.embeddings.0"]["state_bytes"] == 2 * 302 * d * 4  # Adam: two moments
    card = model_card(model, "adagrad")
    assert "item_tower.embeddings.0" in card and "looked-up rows only" in card


def test_a_model_that_cannot_fit_is_refused_before_training_with_the_numbers():
    from conftest import compose
    from raycg.model.card import training_bytes
    from raycg.train.preflight import PreflightError, check_model_memory

    cfg_model = configs()[0]
    dense = TwoTowerModel(cfg_model, spec())
    sparse = TwoTowerModel(configs("model.sparse_tables=true")[0], spec())
    n = sum(p.numel() for p in dense.parameters())
    assert training_bytes(dense) == 4 * n * 4  # weights + two Adam moments + gradient, fp32
    assert training_bytes(sparse, "adagrad") < training_bytes(dense)
    cfg = compose(["trainer.num_workers=2"])
    check_model_memory(cfg, 10 * 2**20, embedded=True)  # 10 MiB x 2 workers fit any test machine
    with pytest.raises(PreflightError, match=r"2097152.0 GiB against .* model.sparse_tables=true .*model.vocab.max_size"):
        check_model_memory(cfg, 2**50, embedded=True)
    check_model_memory(cfg, 2**50, embedded=False)  # a cluster's CPU nodes are not known to the driver
