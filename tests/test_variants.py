"""Every tower structure x head design, at the model level, plus one run end to end.

The model-level test (no Ray, every combination) builds the model from the composed Hydra
config as the workers do (history on, small widths), trains it with the real training step
on one batch (impression hard negatives; no logQ and no mixed negatives, so that the loss of a
fixed batch is a fixed function of the weights), and checks that the loss goes down, that
every parameter gets a gradient, and that the checkpoint and the exported (torch.export) towers
give back the same embeddings. The end-to-end run covers the design no other end-to-end test trains: a
multi-head model (served by its conversion head) on the cross-only structure, through Ray
Train, evaluation and export.
"""
import json
import math

import numpy as np
import pytest
import torch

from conftest import compose
from raycg.model.export import export_towers, item_inputs, load_towers, user_inputs
from raycg.model.towers import HEAD_SETS, STRUCTURES
from raycg.model.two_tower import TwoTowerModel
from raycg.model import checkpoint as ckpt_io
from raycg.train.optim import build_optimizer
from raycg.train.step import StepContext, train_step
from test_train_step import N_ITEMS, L, corpus, packed_batch, spec


def small_configs(*overrides):
    """(model, loss, trainer) config sections as the workers get them, with small widths."""
    from omegaconf import OmegaConf

    cfg = compose(["loss.log_q_correction=false", "loss.hard_negatives=2", "loss.duration_weighting=true", f"model.history.length={L}",
                   "model.mlp_dims=[32,16]", "model.head_dims=[16]", "model.embedding_dim=16", "model.id_dim=8",
                   "trainer.lr=0.01", *overrides])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model["buckets"] = {"user": 101, "surface": 8, "context_item": N_ITEMS + 2, "query": 51, "item": N_ITEMS + 2,
                        "advertiser": 23, "category": 13}
    return model, OmegaConf.to_container(cfg.loss, resolve=True), OmegaConf.to_container(cfg.trainer, resolve=True)


@pytest.mark.parametrize("heads", list(HEAD_SETS))
@pytest.mark.parametrize("structure", STRUCTURES)
def test_structure_and_heads_train_checkpoint_and_export(structure, heads, tmp_path):
    cfg_model, cfg_loss, cfg_train = small_configs(f"model.cross={structure}", f"model.heads={heads}")
    rng = np.random.default_rng(0)
    items = corpus(rng)
    torch.manual_seed(0)
    model = TwoTowerModel(cfg_model, spec())
    # model.item_bias=prior (the default): as the workers do, from the training window's counts
    model.set_item_prior(items.item_id, np.random.default_rng(1).integers(0, 50, len(items.item_id)))
    assert model.user_tower.body.structure == model.item_tower.body.structure == structure
    opt = build_optimizer(model, cfg_train, torch.device("cpu"))
    ctx = StepContext(cfg_loss, items, seed=0, freq_buckets=cfg_model["buckets"]["item"])
    batch = packed_batch(rng, items, "cpu")
    user_out, item_out = model(batch)
    assert set(user_out) == set(item_out) == set(HEAD_SETS[heads])

    losses = []
    for step in range(10):  # the same batch: the model must be able to fit it
        loss, parts = train_step(model, model, batch, opt, ctx)
        losses.append(loss.item())
        if step == 0:
            dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
            assert dead == [], dead
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.8 * losses[0], losses

    # checkpoint -> load_model (what evaluation and export read) -> torch.export towers
    ckpt_io.save(str(tmp_path), model, opt, 0, {"model": cfg_model}, spec().to_dict(), step_state=ctx.state_dict())
    loaded, _ = ckpt_io.load_model(str(tmp_path))
    export_towers(loaded, str(tmp_path / "export"))
    user, item, _ = load_towers(str(tmp_path / "export"))
    model.eval()
    with torch.no_grad():
        want_u, want_i = model.embed_users(batch), model.embed_items(batch)
        torch.testing.assert_close(loaded.embed_users(batch), want_u)
        torch.testing.assert_close(loaded.embed_items(batch), want_i)
        assert (user(*user_inputs(batch)) - want_u).abs().max() < 1e-5
        assert (item(*item_inputs(batch)) - want_i).abs().max() < 1e-5
    serve = json.loads((tmp_path / "export" / "feature_spec.json").read_text())["serve_head"]
    assert serve == ("conversion" if heads == "multi_head" else "unified")
