"""Recent-action history: leakage-free lookup (strictly before t) and the Transformer encoder."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raycg.data.history import ACTION_CODES, HistoryIndex
from raycg.model.history import HistoryEncoder


def _events(rows):
    """rows: (user, item, event_type, timestamp)."""
    u, i, e, t = zip(*rows)
    return pa.table({
        "user_id": pa.array(u, pa.int64()), "item_id": pa.array(i, pa.int64()),
        "event_type": pa.array(e, pa.string()), "timestamp": pa.array(t, pa.int64()),
    })


# User 7: 10 click 100, 20 save 101, 30 checkout 102, 40 add_to_cart 103 (shuffled, plus impressions).
# User 9: one click at 15. User 5: impressions only.
ROWS = [
    (7, 102, "checkout", 30), (9, 900, "click", 15), (7, 100, "click", 10), (7, 555, "impression", 25),
    (5, 500, "impression", 12), (7, 103, "add_to_cart", 40), (7, 101, "save", 20), (7, 556, "impression", 5),
]


def test_lookup_returns_previous_actions_in_order_strictly_before_t():
    index = HistoryIndex.from_events(_events(ROWS))
    assert len(index) == 5  # impressions are not actions
    users = np.array([7, 7, 7, 7, 7, 9, 9, 5, 42])
    ts = np.array([30, 31, 100, 10, 11, 15, 16, 100, 100])
    items, actions = index.lookup(users, ts, 3)
    assert items.dtype == np.int64 and actions.dtype == np.int64 and items.shape == (9, 3)
    expect_items = [
        [-1, 100, 101],  # t=30: the checkout at exactly 30 is excluded
        [100, 101, 102],  # t=31: now it is in, most recent last
        [101, 102, 103],  # t=100: last 3 of 4
        [-1, -1, -1],  # t=10: the click at 10 is not "before" itself
        [-1, -1, 100],
        [-1, -1, -1],  # user 9 at its own event time
        [-1, -1, 900],
        [-1, -1, -1],  # user 5 has impressions only
        [-1, -1, -1],  # unknown user
    ]
    c = ACTION_CODES
    expect_actions = [
        [0, c["click"], c["save"]],
        [c["click"], c["save"], c["checkout"]],
        [c["save"], c["checkout"], c["add_to_cart"]],
        [0, 0, 0], [0, 0, c["click"]], [0, 0, 0], [0, 0, c["click"]], [0, 0, 0], [0, 0, 0],
    ]
    np.testing.assert_array_equal(items, expect_items)
    np.testing.assert_array_equal(actions, expect_actions)
    # padding is consistent: item -1 exactly where action 0
    np.testing.assert_array_equal(items == -1, actions == 0)


def test_lookup_length_longer_than_history_and_edge_times():
    index = HistoryIndex.from_events(_events(ROWS))
    items, actions = index.lookup(np.array([7, 7, 7]), np.array([-5, 0, 10**9]), 6)
    np.testing.assert_array_equal(items[0], [-1] * 6)  # before the earliest timestamp
    np.testing.assert_array_equal(items[1], [-1] * 6)
    np.testing.assert_array_equal(items[2], [-1, -1, 100, 101, 102, 103])  # far future: everything
    assert index.lookup(np.array([7]), np.array([100]), 0)[0].shape == (1, 0)


def test_empty_index_and_dictionary_event_type():
    empty = HistoryIndex.from_events(_events([(1, 1, "impression", 3)]))
    items, actions = empty.lookup(np.array([1, 2]), np.array([5, 5]), 4)
    assert (items == -1).all() and (actions == 0).all()
    t = _events(ROWS)
    t = t.set_column(2, "event_type", t.column("event_type").dictionary_encode())
    a = HistoryIndex.from_events(t).lookup(np.array([7]), np.array([100]), 4)
    b = HistoryIndex.from_events(_events(ROWS)).lookup(np.array([7]), np.array([100]), 4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_build_from_parquet_files_reads_all_splits(tmp_path):
    full = _events(ROWS)
    full = full.append_column("surface", pa.array(["home"] * len(ROWS)))  # extra columns are ignored
    pq.write_table(full.slice(0, 4), tmp_path / "train.parquet")
    pq.write_table(full.slice(4), tmp_path / "eval.parquet")
    built = HistoryIndex.build([str(tmp_path / "train.parquet"), str(tmp_path / "eval.parquet")])
    direct = HistoryIndex.from_events(_events(ROWS))
    users, ts = np.array([7, 7, 9, 5]), np.array([31, 100, 16, 100])
    for x, y in zip(built.lookup(users, ts, 4), direct.lookup(users, ts, 4)):
        np.testing.assert_array_equal(x, y)


def test_future_events_do_not_change_any_lookup():
    rng = np.random.default_rng(0)
    n = 5000
    types = np.array(list(ACTION_CODES) + ["impression"])
    past = pa.table({
        "user_id": pa.array(rng.integers(0, 200, n), pa.int64()),
        "item_id": pa.array(rng.integers(0, 10_000, n), pa.int64()),
        "event_type": pa.array(types[rng.integers(0, len(types), n)]),
        "timestamp": pa.array(rng.integers(1_000, 2_000, n), pa.int64()),
    })
    users = rng.integers(0, 220, 3000)  # some unknown users too
    ts = rng.integers(900, 2_101, 3000)  # query times up to 2100
    base = HistoryIndex.from_events(past).lookup(users, ts, 8)
    m = 3000
    future = pa.table({
        "user_id": pa.array(rng.integers(0, 220, m), pa.int64()),  # incl. new users
        "item_id": pa.array(rng.integers(0, 10_000, m), pa.int64()),
        "event_type": pa.array(types[rng.integers(0, len(types), m)]),
        "timestamp": pa.array(rng.integers(2_101, 5_000, m), pa.int64()),  # >= every query time
    })
    grown = HistoryIndex.from_events(pa.concat_tables([future, past]))  # order of input does not matter
    after = grown.lookup(users, ts, 8)
    np.testing.assert_array_equal(after[0], base[0])
    np.testing.assert_array_equal(after[1], base[1])
    assert (base[1] > 0).any()  # the test is not vacuous


def test_lookup_at_scale_matches_a_brute_force_reference():
    # 200k lookups over 1M events in one vectorised call (no timing here: speed is a benchmark's
    # business); 300 of them checked against a per-row reference
    rng = np.random.default_rng(1)
    n, b, length = 1_000_000, 200_000, 50
    users_all = rng.integers(0, 50_000, n)
    items_all = rng.integers(0, 10**6, n)
    ts_all = rng.integers(1_600_000_000, 1_700_000_000, n)
    kinds = np.array(list(ACTION_CODES))[rng.integers(0, 4, n)]
    index = HistoryIndex.from_events(pa.table({
        "user_id": pa.array(users_all, pa.int64()), "item_id": pa.array(items_all, pa.int64()),
        "event_type": pa.array(kinds), "timestamp": pa.array(ts_all, pa.int64())}))
    users = rng.integers(0, 50_000, b)
    ts = rng.integers(1_600_000_000, 1_700_000_000, b)
    items, actions = index.lookup(users, ts, length)
    assert items.shape == (b, length) and (actions > 0).any()
    for r in rng.choice(b, 300, replace=False):
        mine = np.flatnonzero((users_all == users[r]) & (ts_all < ts[r]))
        mine = mine[np.argsort(ts_all[mine], kind="stable")][-length:]
        got = items[r][actions[r] > 0]
        assert sorted(got.tolist()) == sorted(items_all[mine].tolist())


# ---------------------------------------------------------------- encoder

def _batch():
    items = torch.tensor([[-1, -1, 12, 40, 7], [-1, -1, -1, -1, -1], [3, 4, 5, 6, 8], [-1, -1, -1, -1, 99]])
    actions = torch.tensor([[0, 0, 1, 4, 2], [0, 0, 0, 0, 0], [1, 2, 3, 4, 1], [0, 0, 0, 0, 3]])
    return items, actions


def _encoder(**kw):
    torch.manual_seed(0)
    return HistoryEncoder(num_item_buckets=101, dim=8, max_len=5, **kw)


@pytest.mark.parametrize("train", [True, False])
def test_encoder_shape_and_empty_rows_are_zero(train):
    enc = _encoder(num_layers=2)
    enc.train(train)
    items, actions = _batch()
    with torch.set_grad_enabled(train):
        out = enc(items, actions)
    assert out.shape == (4, 8)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros(8))  # empty history -> exactly zero
    assert (out[[0, 2, 3]].abs().sum(dim=1) > 0).all()
    all_empty = enc(torch.full((3, 5), -1), torch.zeros(3, 5, dtype=torch.long))
    assert torch.equal(all_empty, torch.zeros(3, 8))
    assert enc(items[:, 2:], actions[:, 2:]).shape == (4, 8)  # shorter sequences are fine
    with pytest.raises(ValueError):
        enc(torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 6, dtype=torch.long))  # > max_len


def test_encoder_is_order_aware():
    enc = _encoder()
    items, actions = _batch()
    out = enc(items, actions)
    rev = enc(items.flip(1), actions.flip(1))  # row 2 reversed in place; others move content to the left
    assert not torch.allclose(out[2], rev[2])
    # reversing only the content (padding stays on the left) also changes the output
    items0 = torch.tensor([[-1, -1, 12, 40, 7]])
    actions0 = torch.tensor([[0, 0, 1, 4, 2]])
    a = enc(items0, actions0)
    b = enc(torch.tensor([[-1, -1, 7, 40, 12]]), torch.tensor([[0, 0, 2, 4, 1]]))
    assert not torch.allclose(a, b)


def test_padded_positions_do_not_influence_output():
    enc = _encoder(num_layers=2)
    items, actions = _batch()
    out = enc(items, actions)
    noisy = torch.where(actions == 0, torch.randint(0, 1000, items.shape), items)
    assert torch.allclose(enc(noisy, actions), out, atol=1e-6, rtol=0)
    # prepending more padding does not matter either (positions count from the most recent action)
    enc2 = HistoryEncoder(num_item_buckets=101, dim=8, num_layers=2, max_len=6)
    enc2.load_state_dict({k: (v if k != "position.weight" else torch.cat([v, torch.zeros(1, 8)]))
                          for k, v in enc.state_dict().items()})
    out2 = enc2(torch.cat([torch.full((4, 1), -1), items], 1), torch.cat([torch.zeros(4, 1, dtype=torch.long), actions], 1))
    assert torch.allclose(out2, out, atol=1e-6, rtol=0)


def test_gradients_reach_all_parameters():
    enc = _encoder(num_layers=2)
    items, actions = _batch()
    keep = [0, 2, 3]  # non-empty histories
    out = enc(items[keep], actions[keep])
    (out * torch.randn_like(out)).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # and an empty row contributes no gradient at all (its output is a constant zero)
    enc.zero_grad()
    enc(items[[1]], actions[[1]]).sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in enc.parameters())


def test_history_shares_the_item_towers_id_embedding():
    from raycg.data.spec import FeatureSpec
    from raycg.model.two_tower import TwoTowerModel

    cfg = {"cross": "parallel", "cross_layers": 1, "low_rank": None, "num_experts": 1, "mlp_dims": [8],
           "head_dims": [8], "embedding_dim": 4, "id_dim": 8, "embedding_dropout": 0.0, "cross_dropout": 0.0, "temperature": 0.1,
           "learn_temperature": False, "item_bias": "none", "heads": "unified", "serve_head": None, "sparse_tables": False,
           "history": {"layers": 1, "heads": 2, "share_item_embedding": True},
           "buckets": {"user": 11, "surface": 4, "context_item": 11, "query": 5, "item": 11, "advertiser": 5,
                       "category": 5}}
    spec = FeatureSpec(user_dense=2, item_dense=3, history_length=4)
    shared = TwoTowerModel(cfg, spec)
    assert shared.user_tower.history.items is shared.item_tower.embeddings[0]
    assert sum(p.numel() for p in shared.parameters()) < sum(
        p.numel() for p in TwoTowerModel({**cfg, "history": {**cfg["history"], "share_item_embedding": False}}, spec).parameters())
