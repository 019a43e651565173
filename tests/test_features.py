"""Feature tables: stats from counts, user attributes join, categorical item columns."""
import math

import numpy as np
import pyarrow as pa
import pytest

from raycg.data.batches import FeatureStore, ItemTable
from raycg.data.features import UserTable, aggregate_counts_by, combine_counts, partial_counts, stats_from_counts
from raycg.data.schema import EventSchemaError


def test_stats_from_counts_hand_values():
    # impressions, clicks, saves, conversions
    s = stats_from_counts(np.array([[9, 3, 1, 1]]))[0]
    expected = [math.log(10), math.log(4), math.log(2), math.log(2), 3 / 13, 1 / 4]
    np.testing.assert_allclose(s, expected, rtol=1e-6)


def test_partial_counts_combine_like_one_pass():
    t = pa.table({"item_id": pa.array([5, 5, 7, 7, 7], pa.int64()),
                  "event_type": ["impression", "click", "checkout", "add_to_cart", "save"]})
    ids, counts = combine_counts([partial_counts(t.slice(0, 2), "item_id"), partial_counts(t.slice(2), "item_id")])
    assert ids.tolist() == [5, 7] and counts.tolist() == [[1, 1, 0, 0], [0, 0, 1, 2]]


def test_counts_of_several_keys_in_one_pass_equal_one_key_at_a_time(ray_session):
    import ray

    t = pa.table({"item_id": pa.array([5, 5, 7, 7, 7, 9], pa.int64()), "user_id": pa.array([1, 2, 1, 1, 2, 3], pa.int64()),
                  "timestamp": pa.array([1, 2, 3, 4, 5, 99], pa.int64()),
                  "event_type": ["impression", "click", "checkout", "add_to_cart", "save", "click"]})
    ds = ray.data.from_arrow([t.slice(0, 2), t.slice(2, 3), t.slice(5)])  # three blocks: three map tasks
    # compact_rows=1: the driver sums the pending partial rows after every block as well
    for compact_rows in (1, 10**6):
        both = aggregate_counts_by(ds, ["item_id", "user_id"], before_ts=10, compact_rows=compact_rows)
        for key in ("item_id", "user_id"):  # the last row is at/after the cutoff
            ids, counts = combine_counts([partial_counts(t.slice(0, 5), key)])
            assert both[key][0].tolist() == ids.tolist() and both[key][1].tolist() == counts.tolist()
        assert both["item_id"][0].tolist() == [5, 7] and both["user_id"][1].tolist() == [[1, 0, 0, 2], [0, 1, 1, 0]]


def test_counts_of_an_empty_window_are_empty(ray_session):
    import ray

    t = pa.table({"item_id": pa.array([5], pa.int64()), "timestamp": pa.array([50], pa.int64()),
                  "event_type": ["click"]})
    ids, counts = aggregate_counts_by(ray.data.from_arrow([t]), ["item_id"], before_ts=10)["item_id"]
    assert ids.shape == (0,) and counts.shape == (0, 4)


def test_user_attributes_and_item_categoricals_reach_the_packed_batch():
    users = UserTable(np.array([1, 2]), np.ones((2, 6), np.float32)).with_attributes(
        pa.table({"user_id": pa.array([2, 3], pa.int64()), "segment": pa.array([1, 0], pa.int64())}),
        ["segment"], "users.parquet")
    assert users.cat_names == ("segment",)
    assert users.lookup_cat(np.array([1, 2, 3, 9])).ravel().tolist() == [-1, 1, 0, -1]  # -1 = missing
    assert users.lookup(np.array([3]))[0].sum() == 0  # attributes only: zero stats
    items = ItemTable.from_arrow(pa.table({
        "item_id": pa.array([0, 1], pa.int64()), "advertiser_id": pa.array([0, 0], pa.int64()),
        "category_id": pa.array([0, 0], pa.int64()), "tier": pa.array([1, 0], pa.int64()),
        "content_emb": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(4, np.float32)), 2),
    }), extra_cat=("tier",))
    assert items.cat_names[-1] == "tier" and items.cat[:, 3].tolist() == [1, 0]
    store = FeatureStore(items=items, users=users)
    packed = store.pack_users(pa.table({
        "user_id": pa.array([2, 9], pa.int64()), "surface": ["home", "search"],
        "context_item_id": pa.array([-1, -1], pa.int64()), "query_id": pa.array([-1, 3], pa.int64())}))
    assert packed["user_cat"].tolist() == [[2, 0, -1, -1, 1], [9, 2, -1, 3, -1]]


def test_bad_user_attribute_names_the_file_and_column():
    users = UserTable(np.array([1]), np.ones((1, 6), np.float32))
    with pytest.raises(EventSchemaError, match="users.parquet: column 'segment' has 1 of 2 rows below 0"):
        users.with_attributes(pa.table({"user_id": pa.array([1, 2], pa.int64()),
                                        "segment": pa.array([0, -4], pa.int64())}), ["segment"], "users.parquet")


def test_nan_in_item_embeddings_is_an_error():
    with pytest.raises(EventSchemaError, match="content_emb' has NaN or infinite"):
        ItemTable.from_arrow(pa.table({
            "item_id": pa.array([0], pa.int64()), "advertiser_id": pa.array([0], pa.int64()),
            "category_id": pa.array([0], pa.int64()),
            "content_emb": pa.FixedSizeListArray.from_arrays(pa.array([1.0, float("nan")], pa.float32()), 2)}))


def test_users_table_duplicates_fail_or_are_quarantined(tmp_path):
    import pyarrow.parquet as pq

    users = UserTable(np.array([1]), np.ones((1, 6), np.float32))
    table = pa.table({"user_id": pa.array([1, 2, 1, 3], pa.int64()), "segment": pa.array([0, 1, 5, -2], pa.int64())})
    with pytest.raises(EventSchemaError, match="users.parquet: column 'segment' has 1 of 4 rows below 0"):
        users.with_attributes(table, ["segment"], "users.parquet")
    dup_only = table.slice(0, 3)
    with pytest.raises(EventSchemaError, match="users.parquet: column 'user_id' has 1 of 3 rows repeating an "
                                               "earlier user, e.g. 1"):
        users.with_attributes(dup_only, ["segment"], "users.parquet")
    kept = users.with_attributes(table, ["segment"], "users.parquet", quarantine_dir=str(tmp_path))
    assert kept.rows_quarantined == 2 and kept.lookup_cat(np.array([1, 2, 3])).ravel().tolist() == [0, 1, -1]
    rejected = pq.read_table(tmp_path / "users.parquet")
    assert rejected.column("quarantine_reason").to_pylist() == ["user_id:duplicate", "segment:below_min"]
