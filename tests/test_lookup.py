"""The sorted-id lookup (raycg.data.lookup): golden values by hand, numpy and torch alike."""
import numpy as np
import pytest
import torch

from raycg.data import lookup
from raycg.data.lookup import find_sorted, find_sorted_torch

TABLE = [10, 20, 30]
# present (first, middle, last), below the minimum, between two ids, above the maximum
IDS = [10, 20, 30, 5, 25, 99]
POS = [0, 1, 2, 0, 2, 2]
HIT = [True, True, True, False, False, False]


def test_numpy_golden_values():
    pos, hit = find_sorted(np.array(TABLE, np.int64), np.array(IDS, np.int64))
    assert pos.tolist() == POS and hit.tolist() == HIT
    values = np.array([100, 200, 300])
    assert values[pos[hit]].tolist() == [100, 200, 300]


def test_numpy_empty_table_and_empty_ids():
    pos, hit = find_sorted(np.zeros(0, np.int64), np.array([1, 2], np.int64))
    assert pos.tolist() == [0, 0] and hit.tolist() == [False, False]
    pos, hit = find_sorted(np.array(TABLE, np.int64), np.zeros(0, np.int64))
    assert pos.shape == hit.shape == (0,)
    pos, hit = find_sorted(np.array(TABLE), [[20, 7]])  # any shape of ids, lists too
    assert pos.tolist() == [[1, 0]] and hit.tolist() == [[True, False]]


def test_torch_golden_values_and_empty_table():
    pos, hit = find_sorted_torch(torch.tensor(TABLE), torch.tensor(IDS))
    assert pos.tolist() == POS and hit.tolist() == HIT
    pos, hit = find_sorted_torch(torch.zeros(0, dtype=torch.int64), torch.tensor([[1, 2]]))
    assert pos.tolist() == [[0, 0]] and hit.tolist() == [[False, False]]
    assert hit.dtype == torch.bool and pos.dtype == torch.int64


def test_torch_lookup_compiles_without_graph_breaks():
    # the model's id tables call it in a forward that trainer.compile may compile
    fn = torch.compile(find_sorted_torch, backend="eager", fullgraph=True)
    pos, hit = fn(torch.tensor(TABLE), torch.tensor(IDS))
    assert pos.tolist() == POS and hit.tolist() == HIT


def test_vocabulary_rows_through_the_helper():
    # the docstring example of VocabEmbedding, eager and compiled (no graph break)
    from raycg.model.towers import VocabEmbedding

    table = VocabEmbedding(3, 2, 4, vocab=[7, 42, 2**40])
    ids = torch.tensor([-1, 7, 2**40, 5])
    assert table.rows(ids).tolist() == [0, 3, 5, 2]
    assert torch.compile(table.rows, backend="eager", fullgraph=True)(ids).tolist() == [0, 3, 5, 2]


def test_the_dense_position_array_gives_the_binary_search_answer():
    """Many ids against a dense integer table take the position-array route: same positions
    and hits as searchsorted, misses (gaps, below, above) included."""

    rng = np.random.default_rng(0)
    table = np.sort(rng.choice(np.arange(1000, 5000), 3000, replace=False)).astype(np.int64)
    ids = rng.integers(900, 5100, size=lookup.DENSE_MIN_IDS + 7).astype(np.int64)
    assert lookup._dense_slots(table, ids) is not None  # the fast route is the one under test
    pos, hit = find_sorted(table, ids)
    want_pos = np.searchsorted(table, ids).clip(0, len(table) - 1)
    assert (pos == want_pos).all() and (hit == (table[want_pos] == ids)).all()
    assert 0 < hit.mean() < 1
    inside = rng.integers(table[0], table[-1] + 1, size=lookup.DENSE_MIN_IDS)  # every id in range
    pos, hit = find_sorted(table, inside)
    want_pos = np.searchsorted(table, inside).clip(0, len(table) - 1)
    assert (pos == want_pos).all() and (hit == (table[want_pos] == inside)).all() and 0 < hit.mean() < 1
    # a table with a repeated id, or ids too sparse for the array, take the binary search
    assert lookup._dense_slots(np.array([1, 2, 2, 3]), ids) is None
    assert lookup._dense_slots(table * 10, ids) is None


@pytest.mark.parametrize("span", [50, 10**12])  # dense: marks over the range; sparse: np.unique
def test_unique_ids_is_np_unique(span):
    rng = np.random.default_rng(1)
    ids = rng.integers(-7, span, size=lookup.DENSE_MIN_IDS + 11).astype(np.int64)
    got = lookup.unique_ids(ids)
    assert got.dtype == ids.dtype and got.tolist() == np.unique(ids).tolist()
    assert lookup.unique_ids(ids[:5]).tolist() == np.unique(ids[:5]).tolist()
