"""Exported towers (torch.export, loaded back from disk) reproduce the in-framework embeddings
(max abs diff < 1e-5 on CPU)."""
import json

import torch

from raycg.data.spec import FeatureSpec
from raycg.model.export import FORMAT_VERSION, export_towers, load_towers, user_inputs
from raycg.model.two_tower import TwoTowerModel

CFG = {
    "cross": "parallel", "cross_layers": 2, "low_rank": 4, "num_experts": 2, "mlp_dims": [32, 16, 8],
    "head_dims": [16], "embedding_dim": 8, "id_dim": 8, "temperature": 0.07, "heads": "multi_head",
    "embedding_dropout": 0.0, "cross_dropout": 0.0, "learn_temperature": False, "item_bias": "none", "serve_head": None, "sparse_tables": False,
    "history": {"layers": 1, "heads": 2, "share_item_embedding": False},
    "buckets": {"user": 50, "surface": 8, "context_item": 50, "query": 10, "item": 50, "advertiser": 10,
                "category": 10},
}


def _inputs(n, g):
    return {
        "user_cat": torch.stack([torch.randint(-1, 60, (n,), generator=g), torch.randint(0, 3, (n,), generator=g),
                                 torch.randint(-1, 60, (n,), generator=g), torch.randint(-1, 9, (n,), generator=g)], 1),
        "user_dense": torch.randn(n, 3, generator=g),
        "hist_items": torch.randint(-1, 60, (n, 6), generator=g),
        "hist_actions": torch.randint(0, 5, (n, 6), generator=g) * (torch.rand(n, 6, generator=g) > 0.3),
        "item_cat": torch.randint(0, 60, (n, 3), generator=g),
        "item_dense": torch.randn(n, 5, generator=g),
    }


def test_exported_towers_match_the_model(tmp_path):
    torch.manual_seed(0)
    spec = FeatureSpec(user_dense=3, item_dense=5, history_length=6, user_dense_mean=[1.0, 2.0, 3.0],
                       user_dense_std=[0.5, 1.0, 2.0], item_dense_mean=[0.1] * 5, item_dense_std=[3.0] * 5)
    model = TwoTowerModel(CFG, spec).eval()
    paths = export_towers(model, str(tmp_path))
    user, item, _ = load_towers(str(tmp_path))
    batch = _inputs(33, torch.Generator().manual_seed(1))  # another batch size than the export example
    batch["hist_actions"][0] = 0  # an empty history
    with torch.no_grad():
        assert (user(*user_inputs(batch)) - model.embed_users(batch)).abs().max() < 1e-5
        assert (item(batch["item_cat"], batch["item_dense"]) - model.embed_items(batch)).abs().max() < 1e-5
    meta = json.loads((tmp_path / "feature_spec.json").read_text())
    assert meta["user_dense_mean"] == [1.0, 2.0, 3.0] and meta["serve_head"] == "conversion"
    assert meta["format_version"] == FORMAT_VERSION and paths["user_tower"].endswith(".pt2")
    # the normalisation statistics are applied inside the exported tower
    shifted = dict(batch, user_dense=batch["user_dense"] + 1.0)
    with torch.no_grad():
        assert (user(*user_inputs(shifted)) - user(*user_inputs(batch))).abs().max() > 1e-3
    one = {k: v[:1] for k, v in batch.items()}  # the batch dimension is dynamic down to 1
    with torch.no_grad():
        assert (user(*user_inputs(one)) - model.embed_users(one)).abs().max() < 1e-5


def test_exported_towers_carry_the_item_bias(tmp_path):
    """model.item_bias: the exported towers serve [u, T] and [v, b]; their inner product / T is
    the trained score <u, v> / T + b (what the export's faiss index ranks by)."""
    torch.manual_seed(0)
    spec = FeatureSpec(user_dense=3, item_dense=5, history_length=6)
    model = TwoTowerModel(dict(CFG, item_bias="learned"), spec).eval()
    with torch.no_grad():
        for layer in model.item_tower.bias.values():
            layer.weight.normal_()
    export_towers(model, str(tmp_path))
    user, item, _ = load_towers(str(tmp_path))
    batch = _inputs(9, torch.Generator().manual_seed(1))
    with torch.no_grad():
        u, v = user(*user_inputs(batch)), item(batch["item_cat"], batch["item_dense"])
        assert (u - model.embed_users(batch)).abs().max() < 1e-5 and (v - model.embed_items(batch)).abs().max() < 1e-5
    E = CFG["embedding_dim"]
    assert v.shape[1] == E + 1 and v[:, E].std() > 0 and torch.allclose(u[:, E], model.temperature.expand(9))
    assert json.loads((tmp_path / "feature_spec.json").read_text())["embedding_dim"] == E + 1


def test_exported_towers_carry_the_repeat_match(tmp_path):
    """model.history.match_dim: the exported towers compute the hashed item codes and the
    history term themselves (raw ids in, the same vectors out), the item bias beside them."""
    torch.manual_seed(0)
    spec = FeatureSpec(user_dense=3, item_dense=5, history_length=6)
    cfg = dict(CFG, item_bias="learned", history=dict(CFG["history"], match_dim=32, match_init=2.0))
    model = TwoTowerModel(cfg, spec).eval()
    export_towers(model, str(tmp_path))
    user, item, _ = load_towers(str(tmp_path))
    batch = _inputs(9, torch.Generator().manual_seed(1))
    batch["item_cat"][:, 0] += 10**12  # ids beyond every table: hashed codes need none
    with torch.no_grad():
        u, v = user(*user_inputs(batch)), item(batch["item_cat"], batch["item_dense"])
        assert (u - model.embed_users(batch)).abs().max() < 1e-5 and (v - model.embed_items(batch)).abs().max() < 1e-5
    assert u.shape[1] == v.shape[1] == CFG["embedding_dim"] + 1 + 32
    assert v[:, -32:].abs().min() > 0 and u[:, -32:].abs().max() > 0
