"""Impression hard negatives: drawn from the same user's impressions, -1 when there are none."""
import numpy as np
import pyarrow as pa

from raycg.data.batches import FeatureStore, ItemTable, pack_events
from raycg.data.features import UserTable
from raycg.data.negatives import ImpressionIndex


def _items(n=6):
    return ItemTable.from_arrow(pa.table({
        "item_id": pa.array(np.arange(100, 100 + n), pa.int64()),
        "advertiser_id": pa.array(np.zeros(n), pa.int64()),
        "category_id": pa.array(np.zeros(n), pa.int64()),
        "content_emb": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(2 * n, np.float32)), 2),
    }))


def test_index_samples_only_that_users_impressions():
    items = _items()
    events = pa.table({
        "user_id": pa.array([1, 1, 2, 1, 3], pa.int64()),
        "item_id": pa.array([101, 102, 103, 104, 105], pa.int64()),
        "event_type": ["impression", "impression", "impression", "click", "click"],
    })
    index = ImpressionIndex.from_events(events, items)
    assert len(index) == 3  # clicks are not hard negatives
    rows = index.sample(np.array([1, 2, 3, 1]), 50, np.random.default_rng(0))
    ids = np.where(rows >= 0, items.item_id[rows.clip(0)], -1)
    assert set(ids[0]) == {101, 102} and set(ids[3]) == {101, 102}  # both drawn, nothing else
    assert set(ids[1]) == {103}
    assert (ids[2] == -1).all()  # user 3 saw nothing without engaging


def test_pack_events_adds_hard_rows():
    items = _items()
    events = pa.table({
        "user_id": pa.array([1, 1, 1], pa.int64()), "item_id": pa.array([101, 102, 103], pa.int64()),
        "advertiser_id": pa.array([0, 0, 0], pa.int64()), "surface": ["home"] * 3,
        "event_type": ["impression", "click", "checkout"],
        "click_duration": pa.array([0, 3, 0], pa.float32()),
        "timestamp": pa.array([1_700_000_001, 1_700_000_002, 1_700_000_003], pa.int64()),
        "context_item_id": pa.array([-1] * 3, pa.int64()), "query_id": pa.array([-1] * 3, pa.int64()),
    })
    index = ImpressionIndex.from_events(events, items)
    store = FeatureStore(items=items, users=UserTable(np.array([1]), np.ones((1, 6), np.float32)))
    packed = pack_events(events, store, impressions=index, num_hard=3, seed=1)
    assert packed["user_dense"].shape == (2, 6 + 2) and (packed["user_dense"][:, :6] == 1).all()
    assert packed["hard_rows"].shape == (2, 3)
    assert (items.item_id[packed["hard_rows"]] == 101).all()
    again = pack_events(events, store, impressions=index, num_hard=3, seed=1)
    assert np.array_equal(again["hard_rows"], packed["hard_rows"])  # deterministic
