"""Cross layers against an independent float64 numpy reference; tower structures."""
import numpy as np
import pytest
import torch

from raycg.model.cross import CrossLayer, CrossNetwork
from raycg.model.towers import STRUCTURES, HashedEmbedding, TowerBody
from raycg.model.two_tower import TwoTowerModel


def np_cross(x0, xl, W, b):
    # x_{l+1} = x0 * (W x_l + b) + x_l, row-vector form: (x_l @ W^T + b)
    return x0 * (xl @ W.T + b) + xl


def _rand_layer(layer, rng):
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.as_tensor(rng.normal(size=p.shape)))


@pytest.mark.parametrize("low_rank", [None, 3, 8])
def test_cross_network_matches_numpy_reference(low_rank):
    rng = np.random.default_rng(0)
    net = CrossNetwork(dim=8, num_layers=3, low_rank=low_rank).double()
    # a rank >= the width factorises nothing: the layer keeps a full-rank W
    assert all((layer.V is None) == (low_rank in (None, 8)) for layer in net.layers)
    _rand_layer(net, rng)
    x0 = rng.normal(size=(5, 8))
    out = net(torch.as_tensor(x0)).detach().numpy()
    x = x0
    for layer in net.layers:
        W = layer.W.weight.detach().numpy()
        if layer.V is not None:
            W = W @ layer.V.weight.detach().numpy()  # U (V^T x): [8,r] @ [r,8]
        x = np_cross(x0, x, W, layer.W.bias.detach().numpy())
    np.testing.assert_allclose(out, x, rtol=1e-6, atol=1e-12)


def test_bias_is_inside_the_product():
    layer = CrossLayer(4).double()
    with torch.no_grad():
        layer.W.weight.zero_()
        layer.W.bias.fill_(2.0)
    x0 = torch.full((1, 4), 3.0, dtype=torch.float64)
    x = torch.full((1, 4), 1.0, dtype=torch.float64)
    # inside: 3 * (0 + 2) + 1 = 7 ; a bias outside the product would give 3*0 + 2 + 1 = 3
    assert torch.allclose(layer(x0, x), torch.full((1, 4), 7.0, dtype=torch.float64))


def test_low_rank_has_fewer_parameters():
    full = sum(p.numel() for p in CrossLayer(64).parameters())
    low = sum(p.numel() for p in CrossLayer(64, low_rank=8).parameters())
    assert full == 64 * 64 + 64 and low == 2 * 64 * 8 + 64


def test_parallel_and_stacked_differ_as_defined():
    torch.manual_seed(0)
    par = TowerBody(12, "parallel", 2, None, [16, 8, 4])
    stk = TowerBody(12, "stacked", 2, None, [16, 8, 4])
    stk.load_state_dict(par.state_dict())  # identical weights: same module names/shapes
    x0 = torch.randn(7, 12)
    cross_out = par.cross(x0)
    assert torch.allclose(par(x0), torch.cat([cross_out, par.mlp(x0)], dim=-1))
    assert torch.allclose(stk(x0), par.mlp(cross_out))
    assert TowerBody(12, "cross_only", 2, None, [4])(x0).shape == (7, 12)
    assert TowerBody(12, "mlp_only", 2, None, [16, 8, 4])(x0).shape == (7, 4)


def test_cross_dropout_touches_the_cross_path_only():
    torch.manual_seed(0)
    x0 = torch.randn(64, 12)
    plain = TowerBody(12, "parallel", 2, None, [16, 8, 4])
    dropped = TowerBody(12, "parallel", 2, None, [16, 8, 4], cross_dropout=0.5)
    dropped.load_state_dict(plain.state_dict())  # dropout has no parameters
    cross_out, mlp_out = plain.cross(x0), plain.mlp(x0)
    dropped.eval()
    assert torch.equal(dropped(x0), plain(x0))  # identity at serving time
    dropped.train()
    out = dropped(x0)
    assert torch.equal(out[:, 12:], mlp_out)  # the MLP half reads x0 untouched
    kept = out[:, :12] != 0
    assert 0.3 < kept.float().mean() < 0.7  # about half the cross outputs dropped
    assert torch.allclose(out[:, :12][kept], 2 * cross_out[kept])  # inverted dropout: survivors x 1/(1-p)
    stacked = TowerBody(12, "stacked", 2, None, [16, 8, 4], cross_dropout=0.5)
    stacked.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    a = stacked(x0)
    torch.manual_seed(1)
    mask = torch.nn.functional.dropout(torch.ones(64, 12), 0.5)
    assert torch.allclose(a, plain.mlp(cross_out * mask))  # stacked: the MLP reads the dropped cross output
    with pytest.raises(ValueError, match="cross_dropout"):
        TowerBody(12, "parallel", 2, None, [4], cross_dropout=1.0)


def test_hashed_embedding_missing_id_is_zero():
    emb = HashedEmbedding(11, 4)
    out = emb(torch.tensor([-1, 3, 13]))
    assert torch.all(out[0] == 0)
    # 3 and 13 collide in 10 usable buckets (3 % 10 == 13 % 10)
    assert torch.equal(out[1], out[2]) and out[1].abs().sum() > 0


def _model_cfg(structure):
    return {
        "cross": structure, "cross_layers": 2, "low_rank": None, "num_experts": 1, "mlp_dims": [32, 16, 8],
        "head_dims": [16], "embedding_dim": 8, "id_dim": 4, "embedding_dropout": 0.0, "cross_dropout": 0.0, "temperature": 0.1,
        "learn_temperature": True, "item_bias": "none", "heads": "unified", "serve_head": None, "sparse_tables": False,
        "history": {"layers": 1, "heads": 2, "share_item_embedding": False},
        "buckets": {"user": 50, "surface": 8, "context_item": 50, "query": 10, "item": 50,
                    "advertiser": 10, "category": 10},
    }


def _spec():
    from raycg.data.spec import FeatureSpec

    return FeatureSpec(user_dense=3, item_dense=5, history_length=4,
                       user_dense_mean=[0.5, 0.0, 1.0], user_dense_std=[2.0, 1.0, 1.0])


def _batch(n=6, dense=5):
    g = torch.Generator().manual_seed(0)
    return {
        "user_dense": torch.randn(n, 3, generator=g),
        "hist_items": torch.randint(0, 40, (n, 4), generator=g),
        "hist_actions": torch.tensor([[0, 1, 2, 3], [1, 1, 1, 1], [0, 0, 0, 4], [2, 3, 4, 1], [0, 0, 1, 2], [1, 2, 3, 4]][:n]),
        "user_cat": torch.stack([torch.randint(0, 40, (n,), generator=g), torch.randint(0, 3, (n,), generator=g),
                                 torch.randint(-1, 40, (n,), generator=g), torch.randint(-1, 5, (n,), generator=g)], 1),
        "item_cat": torch.stack([torch.arange(n), torch.randint(0, 5, (n,), generator=g),
                                 torch.randint(0, 5, (n,), generator=g)], 1),
        "item_dense": torch.randn(n, dense, generator=g),
    }


@pytest.mark.parametrize("heads", ["unified", "multi_head"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_gradient_reaches_every_parameter(structure, heads):
    torch.manual_seed(0)
    model = TwoTowerModel(dict(_model_cfg(structure), heads=heads), _spec())
    b = _batch()
    user_out, item_out = model(b)
    assert set(user_out) == set(item_out) == ({"unified"} if heads == "unified" else {"engagement", "conversion"})
    sum((user_out[h] @ item_out[h].T / model.temperature).logsumexp(1).sum() for h in user_out).backward()
    u = model.embed_users(b)
    if heads == "multi_head":  # serving uses the conversion head
        assert torch.equal(u, user_out["conversion"])
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []
    assert u.shape == (6, 8) and torch.allclose(u.norm(dim=-1), torch.ones(6), atol=1e-6)


@pytest.mark.parametrize("low_rank", [3, 8])  # 8 >= dim: rank-8 factors of a 6-wide layer
def test_mixture_of_low_rank_experts_matches_the_papers_formula(low_rank):
    """DCN v2 (Wang et al.), mixture of low-rank experts:
    E_i(x_l) = x0 * (U_l^i g(C_l^i g(V_l^i^T x_l)) + b_l), x_{l+1} = sum_i G_i(x_l) E_i(x_l) + x_l,
    with one bias b_l per layer shared by the experts."""
    from raycg.model.cross import MixtureCrossLayer

    rng = np.random.default_rng(2)
    layer = MixtureCrossLayer(dim=6, low_rank=low_rank, num_experts=4).double()
    _rand_layer(layer, rng)
    assert sum(p.numel() for p in layer.parameters()) == 4 * (6 * low_rank + low_rank * low_rank + low_rank * 6) + 6 + 6 * 4
    x0, xl = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
    got = layer(torch.as_tensor(x0), torch.as_tensor(xl)).detach().numpy()

    def w(m):
        return m.weight.detach().numpy()

    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    logits = xl @ w(layer.gate).T
    gates = np.exp(logits - logits.max(1, keepdims=True))
    gates /= gates.sum(1, keepdims=True)
    ref = xl.copy()
    for k in range(4):  # the paper's g = ReLU
        h = relu(relu(xl @ w(layer.V[k]).T) @ w(layer.C[k]).T)
        ref += gates[:, k:k + 1] * x0 * (h @ w(layer.U[k]).T + layer.bias.detach().numpy())
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12)


def test_mixture_tower_trains_every_parameter():
    torch.manual_seed(0)
    model = TwoTowerModel(dict(_model_cfg("parallel"), low_rank=4, num_experts=3), _spec())
    user_out, item_out = model(_batch())
    (user_out["unified"] @ item_out["unified"].T / model.temperature).logsumexp(1).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []


def test_model_card_counts_and_flops():
    from raycg.model.card import component_params, flops_per_example, model_card

    model = TwoTowerModel(dict(_model_cfg("parallel"), heads="multi_head"), _spec())
    params = component_params(model)
    assert sum(params.values()) == sum(p.numel() for p in model.parameters()) - 1  # all but log_temperature
    # item x0 = 3 ids x 4 dims + 5 dense = 17; full-rank cross: 2 layers x (17*17 + 17)
    assert params["item_tower.cross"] == 2 * (17 * 17 + 17)
    flops = flops_per_example(model)
    # item tower matmuls: cross 2x17x17, mlp 17x32+32x16+16x8, two heads of ((17+8)x16 + 16x8); 2 FLOPs per MAC
    expected = 2 * (2 * 17 * 17 + 17 * 32 + 32 * 16 + 16 * 8 + 2 * (25 * 16 + 16 * 8))
    assert flops["item_tower"] == expected
    assert flops["user_tower"] > 0 and params["user_tower.history"] > 0
    assert "total" in model_card(model)


def test_item_bias_is_served_as_one_inner_product():
    """model.item_bias: <[u, T], [v, b]> / T = <u, v> / T + b, with [u, T] and [v, b] what the
    towers serve (evaluation, faiss, export), u and v still unit vectors."""
    from raycg.model.two_tower import TwoTowerModel

    torch.manual_seed(0)
    cfg = dict(_model_cfg("parallel"), item_bias="learned", learn_temperature=False, temperature=0.25)
    model = TwoTowerModel(cfg, _spec()).eval()
    batch = _batch()
    with torch.no_grad():
        assert torch.all(model.embed_items(batch)[:, -1] == 0)  # zero at initialisation: the bias-free model
        layer = model.item_tower.bias["unified"]
        layer.bias.fill_(1.5)
        layer.weight.normal_()
        users, items = model.embed_users(batch), model.embed_items(batch)
    E = cfg["embedding_dim"]
    assert users.shape == items.shape == (6, E + 1)
    torch.testing.assert_close(users[:, :E].norm(dim=1), torch.ones(6))
    torch.testing.assert_close(items[:, :E].norm(dim=1), torch.ones(6))
    assert torch.all(users[:, E] == 0.25)  # the temperature
    b = items[:, E]
    assert b.std() > 0  # a function of the item, not a constant
    score = users @ items.T / 0.25
    torch.testing.assert_close(score, users[:, :E] @ items[:, :E].T / 0.25 + b[None, :])


def test_item_bias_learns_popularity_under_log_q_correction():
    """Items drawn with a skewed popularity and no user signal: with logQ correction the
    in-batch softmax estimates log p(item), which only the bias can carry for every user at
    once; the learned bias orders the items by popularity."""
    from raycg.losses.frequency import StreamingFrequencyEstimator
    from raycg.losses.objective import training_loss
    from raycg.model.two_tower import TwoTowerModel

    torch.manual_seed(0)
    cfg = dict(_model_cfg("mlp_only"), item_bias="learned", learn_temperature=False)
    model = TwoTowerModel(cfg, _spec())
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_cfg = {"conversion_weight": 1.0, "engagement_weight": 1.0, "t_max": 10.0, "duration_weighting": False,
                "mask_accidental_hits": True, "log_q_correction": True, "cross_worker_negatives": False,
                "advertiser_weight": 0.0, "advertiser_block_rows": None}
    popularity = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    freq = StreamingFrequencyEstimator(1000, alpha=0.05)
    g = torch.Generator().manual_seed(1)
    n = 64
    for step in range(300):
        batch = _batch(n=6)
        items = torch.multinomial(popularity, n, replacement=True, generator=g)
        batch = {k: v[torch.randint(0, 6, (n,), generator=g)] for k, v in batch.items()}  # users: noise
        batch["item_cat"] = torch.stack([items, items % 5, items % 3], 1)
        batch["item_dense"] = torch.zeros(n, 5)  # the item id is the only item feature
        batch["signals"] = torch.tensor([[0, 1, 0, 0.0]]).expand(n, 4)  # engagement rows
        freq.update(items, step)
        user_out, item_out = model(batch)
        loss, _ = training_loss(user_out, item_out, batch, loss_cfg, model.temperature, freq=freq, score_extras=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        corpus = _batch(n=6)
        corpus["item_cat"] = torch.stack([torch.arange(6), torch.arange(6) % 5, torch.arange(6) % 3], 1)
        corpus["item_dense"] = torch.zeros(6, 5)
        bias = model.embed_items(corpus)[:, -1]
    assert torch.equal(torch.argsort(bias, descending=True), torch.arange(6)), bias


def test_item_bias_prior_is_log_one_plus_the_items_events():
    """model.item_bias=prior: b = linear read-out (zero at the start) + w * log(1 + events of the
    item's table row), w = 1 at the start; ids sharing a hashed row share their events."""
    import math

    from raycg.model.two_tower import TwoTowerModel

    torch.manual_seed(0)
    model = TwoTowerModel(dict(_model_cfg("parallel"), item_bias="prior"), _spec()).eval()
    # the item table hashes into 50 rows: id % 49 + 1, so 3 and 52 share a row
    model.set_item_prior([3, 7, 52], [9, 4, 1])
    batch = _batch()
    batch["item_cat"][:, 0] = torch.tensor([3, 52, 7, 5, -1, 3])
    with torch.no_grad():
        b = model.embed_items(batch)[:, -1]
    expected = torch.tensor([math.log(11), math.log(11), math.log(5), 0.0, 0.0, math.log(11)])
    torch.testing.assert_close(b, expected)
    with torch.no_grad():
        model.item_tower.prior_weight.fill_(0.5)
        torch.testing.assert_close(model.embed_items(batch)[:, -1], 0.5 * expected)
    assert "item_tower.prior" in model.state_dict()  # checkpoints and exports carry it
    with pytest.raises(ValueError, match="item_bias='sometimes'"):
        TwoTowerModel(dict(_model_cfg("parallel"), item_bias="sometimes"), _spec())
