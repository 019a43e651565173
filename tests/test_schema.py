"""Bad input fails with a message naming the file, the column and what was wrong."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycg.data.batches import FeatureStore, ItemTable, pack_events
from raycg.data.features import UserTable
from raycg.data.schema import EVENT_SCHEMA, EventSchemaError, check_parquet_files, check_values, footer_rows


def good_events(n=6):
    return pa.table({
        "user_id": pa.array(np.arange(n), pa.int64()),
        "item_id": pa.array(np.arange(n) % 3, pa.int64()),
        "advertiser_id": pa.array(np.zeros(n), pa.int64()),
        "surface": ["home", "related", "search"] * (n // 3),
        "event_type": ["click", "impression", "checkout"] * (n // 3),
        "click_duration": pa.array(np.full(n, 5.0), pa.float32()),
        "timestamp": pa.array(np.full(n, 1_700_000_000), pa.int64()),
        "context_item_id": pa.array([-1, 2, -1] * (n // 3), pa.int64()),
        "query_id": pa.array([-1, -1, 4] * (n // 3), pa.int64()),
    }, schema=EVENT_SCHEMA)


def items():
    return ItemTable.from_arrow(pa.table({
        "item_id": pa.array([0, 1, 2], pa.int64()),
        "advertiser_id": pa.array([10, 11, 12], pa.int64()),
        "category_id": pa.array([5, 6, 7], pa.int64()),
        "content_emb": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(6, dtype=np.float32)), 2),
    }))


def store():
    return FeatureStore(items=items(), users=UserTable(np.zeros(0, np.int64), np.zeros((0, 6), np.float32)))


def write(tmp_path, table, name="part-0.parquet"):
    path = str(tmp_path / name)
    pq.write_table(table, path)
    return path


def test_good_file_passes(tmp_path):
    path = write(tmp_path, good_events())
    assert check_parquet_files([path]) == 6
    check_values(good_events(), path)


def test_missing_column_names_file_and_column(tmp_path):
    path = write(tmp_path, good_events().drop(["surface"]))
    with pytest.raises(EventSchemaError, match=r"part-0\.parquet: missing required column 'surface'"):
        check_parquet_files([path])


def test_wrong_type_names_column(tmp_path):
    t = good_events()
    t = t.set_column(t.schema.get_field_index("user_id"), "user_id", pa.array([str(i) for i in range(6)]))
    with pytest.raises(EventSchemaError, match=r"column 'user_id' has type string, expected integer"):
        check_parquet_files([write(tmp_path, t)])


def test_corrupt_and_empty_files(tmp_path):
    bad = tmp_path / "corrupt.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(EventSchemaError, match="corrupt.parquet: cannot read Parquet footer"):
        check_parquet_files([str(bad)])
    empty = write(tmp_path, good_events().slice(0, 0), "empty.parquet")
    with pytest.raises(EventSchemaError, match="empty.parquet: no rows"):
        check_parquet_files([empty])  # a split with no rows at all is an error ...
    # ... an empty shard beside others is not (Spark and others write them): it counts 0 rows
    assert footer_rows([empty, write(tmp_path, good_events(), "full.parquet")]) == {
        empty: 0, str(tmp_path / "full.parquet"): 6}
    assert check_parquet_files([empty, str(tmp_path / "full.parquet")]) == 6


@pytest.mark.parametrize("column,values,message", [
    ("user_id", pa.array([0, -3, 2, 3, 4, 5], pa.int64()), r"column 'user_id' has 1 of 6 rows below 0, e.g. -3"),
    ("event_type", pa.array(["click", "buy", "click", "click", "click", "click"]),
     r"column 'event_type' has 1 of 6 rows with unknown value, e.g. 'buy'"),
    ("surface", pa.array(["home"] * 5 + ["email"]), r"column 'surface' has 1 of 6 rows with unknown value"),
    ("click_duration", pa.array([1, 2, float("nan"), 4, 5, 6], pa.float32()),
     r"column 'click_duration' has 1 of 6 rows that are negative, NaN or infinite, e.g. NaN"),
    ("click_duration", pa.array([1, -2, 3, 4, 5, 6], pa.float32()), r"click_duration' has 1 of 6 rows"),
    ("item_id", pa.array([0, None, 1, 2, 1, 0], pa.int64()), r"column 'item_id' has 1 null value"),
])
def test_bad_values(column, values, message):
    t = good_events()
    t = t.set_column(t.schema.get_field_index(column), column, values)
    with pytest.raises(EventSchemaError, match=message):
        check_values(t, "shard-7.parquet")
    with pytest.raises(EventSchemaError, match="^shard-7.parquet: "):
        check_values(t, "shard-7.parquet")


def test_per_row_path_names_the_offending_file():
    t = good_events()
    t = t.set_column(t.schema.get_field_index("user_id"), "user_id", pa.array([0, 1, 2, 3, -1, 5], pa.int64()))
    paths = np.array(["a.parquet"] * 3 + ["b.parquet"] * 3, dtype=object)
    with pytest.raises(EventSchemaError, match="^b.parquet: column 'user_id'"):
        check_values(t, paths)


def test_pack_events_keeps_positives_and_joins_items():
    packed = pack_events(good_events(), store())
    # 6 rows: click, impression, checkout x2 -> 4 positives
    assert packed["user_cat"].shape == (4, 4) and packed["user_cat"].dtype == np.int64
    assert packed["item_cat"].shape == (4, 3)
    assert packed["item_dense"].shape == (4, 2) and packed["item_dense"].dtype == np.float32
    assert packed["signals"].shape == (4, 4)
    # row 0 of the output is event 0: click on item 0, surface home (code 0)
    assert packed["user_cat"][0].tolist() == [0, 0, -1, -1]
    assert packed["item_cat"][0].tolist() == [0, 10, 5]
    assert packed["signals"][0].tolist() == [0.0, 1.0, 0.0, 5.0]
    # event 2: checkout on item 2 from search with query 4
    assert packed["user_cat"][1].tolist() == [2, 2, -1, 4]
    assert packed["item_cat"][1].tolist() == [2, 12, 7]
    assert packed["item_dense"][1].tolist() == [4.0, 5.0]
    assert packed["signals"][1, 0] == 1.0


def test_unknown_item_is_an_error():
    t = good_events()
    t = t.set_column(t.schema.get_field_index("item_id"), "item_id", pa.array([0, 1, 2, 99, 1, 0], pa.int64()))
    with pytest.raises(EventSchemaError, match=r"column 'item_id' has 1 of .* not in the item table.*e.g. 99"):
        pack_events(t, store())


def test_ragged_item_embeddings_are_an_error():
    with pytest.raises(EventSchemaError, match="content_emb' is ragged"):
        ItemTable.from_arrow(pa.table({
            "item_id": pa.array([0, 1], pa.int64()), "advertiser_id": pa.array([0, 0], pa.int64()),
            "category_id": pa.array([0, 0], pa.int64()), "content_emb": [[1.0, 2.0], [1.0]],
        }))


def test_timestamps_out_of_range_and_duplicates():
    t = good_events()
    ms = t.set_column(t.schema.get_field_index("timestamp"), "timestamp",
                      pa.array([1_700_000_000_000] + [1_700_000_000] * 5, pa.int64()))  # milliseconds
    with pytest.raises(EventSchemaError, match=r"column 'timestamp' has 1 of 6 rows above 4102444800"):
        check_values(ms, "f.parquet")
    dup = pa.concat_tables([t, t.slice(2, 1)])
    check_values(dup, "f.parquet")  # duplicates are only checked when asked
    with pytest.raises(EventSchemaError, match=r"f.parquet: 1 of 7 rows repeat an earlier event"):
        check_values(dup, "f.parquet", check_duplicates=True)


def test_quarantine_sets_bad_rows_aside_with_reasons(tmp_path):
    import pyarrow.parquet as pq

    from raycg.data.batches import quarantine_rows

    t = good_events()
    t = t.set_column(t.schema.get_field_index("event_type"), "event_type",
                     pa.array(["click", "impression", "buy", "click", "impression", "checkout"]))
    t = t.set_column(t.schema.get_field_index("item_id"), "item_id", pa.array([0, 1, 2, 77, 1, 2], pa.int64()))
    t = pa.concat_tables([t, t.slice(0, 1)])  # row 6 duplicates row 0
    kept = quarantine_rows(t, store(), str(tmp_path / "q"))
    assert kept.num_rows == 4
    rejected = pq.read_table(tmp_path / "q")
    assert sorted(rejected.column("quarantine_reason").to_pylist()) == [
        "*:duplicate", "event_type:unknown_value", "item_id:not_in_item_table"]
    assert kept.num_rows + rejected.num_rows == t.num_rows
    # the same batch again rewrites the same file (no double counting on re-execution)
    quarantine_rows(t, store(), str(tmp_path / "q"))
    assert len(list((tmp_path / "q").iterdir())) == 1
    with pytest.raises(EventSchemaError):
        pack_events(t, store())  # without quarantine the batch fails
    # kept: click, impression, impression, checkout -> 2 positives
    assert pack_events(t, store(), quarantine_dir=str(tmp_path / "q2"))["user_cat"].shape == (2, 4)


def test_duplicated_rows_agrees_with_pandas_on_every_column():
    """The hash prefilter must find exactly pandas' duplicates (keep="first"): copies, rows equal
    but for a string or a float column, nulls, and rows whose numeric columns all agree."""
    from raycg.data.schema import duplicated_rows

    rng = np.random.default_rng(0)
    n = 3000
    table = pa.table({"user_id": rng.integers(0, 40, n), "item_id": rng.integers(0, 5, n),
                      "event_type": rng.choice(["click", "save"], n),
                      "click_duration": pa.array(rng.choice([0.5, 1.5, np.nan], n), pa.float32()),
                      "query_id": pa.array([None if x < 2 else int(x) for x in rng.integers(0, 4, n)], pa.int64())})
    want = table.to_pandas().duplicated(keep="first").to_numpy()
    assert 100 < want.sum() < n - 100  # both kinds of rows are plentiful
    assert duplicated_rows(table).tolist() == want.tolist()
    strings_only = table.select(["event_type"])
    assert duplicated_rows(strings_only).tolist() == strings_only.to_pandas().duplicated().tolist()
