"""raycg.model.recent_boost: score(u, i) = <u, v_i> + b [i in R(u)], served as a merge of the
towers' top-K with R(u). Golden values come from ranking the whole corpus by that formula."""
import json

import numpy as np
import pytest
import torch

from raycg.model.checkpoint import recent_boost as checkpoint_recent_boost
from raycg.eval.recall import recall_at_k, recall_from_flat_ranks
from raycg.model.recent_boost import boost_grid, boosted_ranks, distinct_recent, merge_recent, recent_scores, rows_of
from raycg.train.validation import ValidationSet, validation_recall


def test_distinct_recent_keeps_each_item_once_most_recent_first():
    got = distinct_recent(np.array([[-1, 4, 7, 4], [3, 3, 3, 3], [-1, -1, -1, -1], [1, 2, 3, 4]]))
    assert got.tolist() == [[4, 7, -1, -1], [3, -1, -1, -1], [-1, -1, -1, -1], [4, 3, 2, 1]]
    rng = np.random.default_rng(0)
    items = np.where(rng.random((200, 12)) < 0.2, -1, rng.integers(0, 6, (200, 12)))
    for row, out in zip(items, distinct_recent(items)):
        want = []
        for i in row[::-1]:
            if i >= 0 and i not in want:
                want.append(int(i))
        assert out.tolist() == want + [-1] * (12 - len(want))


def test_rows_of_maps_ids_to_corpus_rows_and_the_rest_to_minus_one():
    corpus = np.array([10, 20, 30, 2**40])
    assert rows_of(np.array([[30, -1, 5], [2**40, 10, 31]]), corpus).tolist() == [[2, -1, -1], [3, 0, -1]]


def _brute_force(q, items, recent, boost, k):
    """Rank the whole corpus by <q, v> + boost [i in R] (R: the recent rows, -1 padding)."""
    scores = q @ items.T
    for r, rows in enumerate(recent):
        scores[r, rows[rows >= 0]] += boost
    return np.argsort(-scores, axis=1, kind="stable")[:, :k], -np.sort(-scores, axis=1)[:, :k]


@pytest.mark.parametrize("boost", [0.0, 0.05, 0.3, 100.0])
def test_merge_of_top_k_and_recent_items_is_the_top_k_of_the_boosted_score(boost):
    rng = np.random.default_rng(1)
    items = rng.normal(size=(500, 8)).astype(np.float32)
    q = rng.normal(size=(64, 8)).astype(np.float32)
    # recent items: some among each query's top-K, some far below, padding in between
    top_all = np.argsort(-(q @ items.T), axis=1)
    recent = np.full((64, 6), -1)
    recent[:, 0] = top_all[:, 3]
    recent[:, 1] = top_all[:, 200]
    recent[:, 3] = top_all[:, 499]
    recent[::2, 4] = top_all[::2, 40]  # at rank 40: inside K for k=40's list, at its edge
    K, k = 50, 40
    top_rows, top_scores = top_all[:, :K], np.take_along_axis(q @ items.T, top_all[:, :K], axis=1)
    rec_s = recent_scores(torch.from_numpy(q), torch.from_numpy(items), torch.from_numpy(recent))
    rows, scores = merge_recent(top_rows, top_scores, recent, rec_s, boost, k)
    want_rows, want_scores = _brute_force(q, items, recent, boost, k)
    np.testing.assert_array_equal(rows.numpy(), want_rows)
    np.testing.assert_allclose(scores.numpy(), want_scores, rtol=1e-5, atol=1e-5)
    if boost == 0.0:  # the towers alone
        np.testing.assert_array_equal(rows.numpy(), top_rows[:, :k])


def test_ranks_of_positives_give_the_recall_of_the_merged_lists():
    # validation tries a grid of boosts through the positives' ranks alone; they must give the
    # recall of the merged lists themselves
    rng = np.random.default_rng(4)
    items = rng.normal(size=(600, 8)).astype(np.float32)
    q = rng.normal(size=(80, 8)).astype(np.float32)
    full = q @ items.T
    order = np.argsort(-full, axis=1)
    K, N = 100, 8
    top, top_s = order[:, :K], np.take_along_axis(full, order[:, :K], axis=1)
    recent = np.stack([rng.choice(600, N, replace=False) for _ in range(80)])
    recent[::3, -3:] = -1  # padding
    recent[::4, 0] = order[::4, 5]  # a recent item the towers rank 6th
    rec_s = recent_scores(torch.from_numpy(q), torch.from_numpy(items), torch.from_numpy(recent))
    # 1-4 positives per query: recent items, items of the towers' list, items in neither
    lengths = rng.integers(1, 5, 80)
    positives = [rng.choice(np.unique(np.concatenate([r[r >= 0], o[:150]])), n, replace=False)
                 for r, o, n in zip(recent, order, lengths)]
    padded = np.full((80, 4), -1)
    mask = np.arange(4) < lengths[:, None]
    padded[mask] = np.concatenate(positives)
    boosts = [0.0, 0.02, 0.3, 1.0, 50.0]
    ranks = boosted_ranks(top, top_s, recent, rec_s, padded, boosts)
    for b, r in zip(boosts, ranks):
        merged = merge_recent(top, top_s, recent, rec_s, b)[0].numpy()
        want = recall_at_k(merged, positives, [1, 10, 50, 100])
        got = {k: float(recall_from_flat_ranks(r.numpy()[mask], lengths, k).mean()) for k in want}
        assert got == pytest.approx(want, abs=1e-12), b
        assert 0 < want[100] < 1


def test_boost_grid_spans_the_towers_alone_to_every_recent_item_first():
    rng = np.random.default_rng(2)
    items = rng.normal(size=(300, 8)).astype(np.float32)
    q = rng.normal(size=(32, 8)).astype(np.float32)
    recent = np.stack([rng.choice(300, 5, replace=False) for _ in range(32)])
    top = np.argsort(-(q @ items.T), axis=1)[:, :100]
    top_s = torch.from_numpy(np.take_along_axis(q @ items.T, top, axis=1))
    rec_s = recent_scores(torch.from_numpy(q), torch.from_numpy(items), torch.from_numpy(recent))
    grid = boost_grid(top_s, rec_s)
    assert grid[0] == 0.0 and grid == sorted(grid) and len(grid) >= 5
    rows, _ = merge_recent(top, top_s, recent, rec_s, grid[-1], 100)
    for r in range(32):  # the largest boost: every recent item first
        assert set(rows[r, :5].tolist()) == set(recent[r].tolist())


class _Lookup(torch.nn.Module):
    """A model whose towers are embedding lookups: item i -> item_emb[i], query j -> user_emb[j]."""

    def __init__(self, item_emb, user_emb):
        super().__init__()
        self.i, self.u = torch.nn.Parameter(torch.from_numpy(item_emb)), torch.nn.Parameter(torch.from_numpy(user_emb))

    def embed_items(self, batch):
        return self.i[batch["row"]]

    def embed_users(self, batch):
        return self.u[batch["row"]]


def _validation_world(positives_recent: bool, seed: int = 3):
    rng = np.random.default_rng(seed)
    n_items, n_q = 400, 300
    items, users = rng.normal(size=(n_items, 8)).astype(np.float32), rng.normal(size=(n_q, 8)).astype(np.float32)
    ranked = np.argsort(-(users @ items.T), axis=1)
    recent = np.stack([ranked[q, 150:153] for q in range(n_q)])  # far below the towers' top-100
    # the positive: one recent item (re-engagement) or the towers' 99th item
    positives = [np.array([recent[q, 1] if positives_recent else ranked[q, 98]]) for q in range(n_q)]
    vset = ValidationSet(item_ids=np.arange(n_items), items={"row": np.arange(n_items)},
                         queries={"conversion": ({"row": np.arange(n_q)}, positives)},
                         recent={"conversion": recent})
    return _Lookup(items, users), vset


def test_validation_fits_a_boost_only_where_recent_items_are_the_positives():
    from contextlib import nullcontext

    core, vset = _validation_world(positives_recent=True)
    out = validation_recall(core, vset, torch.device("cpu"), [10, 100], nullcontext())
    assert out["val_recent_boost"] > 0 and out["val_towers_mean_recall"] == 0.0
    assert out["val_conversion_recall@10"] == out["val_conversion_recall@100"] == out["val_mean_recall"] == 1.0
    core, vset = _validation_world(positives_recent=False)
    out = validation_recall(core, vset, torch.device("cpu"), [10, 100], nullcontext())
    assert out["val_recent_boost"] == 0.0  # two or three boosted items push the positive out of the top 100
    assert out["val_conversion_recall@10"] == 0.0 and out["val_conversion_recall@100"] == 1.0
    assert out["val_mean_recall"] == out["val_towers_mean_recall"] == 0.5
    fixed = validation_recall(core, vset, torch.device("cpu"), [10, 100], nullcontext(), boost=1e3)
    assert fixed["val_recent_boost"] == 1e3 and fixed["val_towers_mean_recall"] == 0.5
    assert fixed["val_conversion_recall@100"] == 0.0  # three recent items first: the positive is 102nd


def test_the_checkpoint_says_which_boost_it_serves(tmp_path):
    def config(**index):
        return {"index": {"recent_items": 50, "recent_boost": None, **index}}

    (tmp_path / "meta.json").write_text(json.dumps({"recent_boost": 0.25}))
    assert checkpoint_recent_boost(str(tmp_path), config()) == (50, 0.25, "fitted on the validation window")
    assert checkpoint_recent_boost(str(tmp_path), config(recent_boost=2.0)) == (50, 2.0, "index.recent_boost")
    assert checkpoint_recent_boost(str(tmp_path), config(recent_items=0))[:2] == (0, 0.0)
    (tmp_path / "meta.json").write_text(json.dumps({"recent_boost": None}))  # no validation window
    assert checkpoint_recent_boost(str(tmp_path), config())[:2] == (50, 0.0)
