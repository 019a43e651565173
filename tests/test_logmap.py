"""The mapping-driven converter (raycg.data.logmap): any CSV/Parquet log in, clear errors out.

All values below are made up; the expected outputs are worked out by hand from the rows."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycg.convert import main as convert_main
from raycg.data.adapters import write_data_dir
from raycg.data.batches import ItemTable
from raycg.data.features import COUNT_KINDS
from raycg.data.hashing import hashed_id
from raycg.data.logmap import ConversionError, convert_log, load_mapping

T0 = 1_700_000_000  # 2023-11-14T22:13:20Z

# headerless: user, item, category, behaviour, unix ms, surface code, shop name
ROWS = [
    (1, 10, 5, "pv", 0, "h", "Acme"),
    (1, 10, 5, "buy", 60_000, "h", "Acme"),     # bought 60 s after the view
    (1, 11, 6, "pv", 120_000, "s", "Bolt"),
    (2, 10, 5, "pv", 1_000, "r", "acme "),      # same shop, other case and a space
    (2, 12, 6, "del", 2_000, "h", "Bolt"),      # a non-event: dropped and counted
    (2, 12, 6, "cart", 500_000, "h", ""),       # no shop
]
MAPPING = {
    "name": "mylog", "header": False,
    "columns": {"user_id": 0, "item_id": 1, "event_type": 3},
    "event_types": {"pv": "click", "buy": "checkout", "cart": "add_to_cart", "del": None},
    "timestamp": {"column": 4, "unit": "ms"},
    "category": {"column": 2, "type": "int"},
    "surface": {"column": 5, "values": {"h": "home", "s": "search", "r": "related"}},
    "advertiser": {"column": 6, "type": "hash", "salt": "shop", "missing": "impute"},
    "click_duration": {"from": "next_event", "cap_s": 100},
}


def _csv(tmp_path, rows, name="log.csv"):
    path = tmp_path / name
    path.write_text("".join(",".join(str(x) for x in r) + "\n" for r in rows))
    return str(path)


def test_headerless_csv_by_position(tmp_path):
    rows = [(u, i, c, e, T0 * 1000 + ms, s, a) for u, i, c, e, ms, s, a in ROWS]
    out = convert_log(_csv(tmp_path, rows), MAPPING)
    ev, meta = out["events"].to_pandas(), out["meta"]
    assert meta["rows_in"] == 6 and meta["rows_out"] == 5 and meta["dropped"]["del"] == 1
    assert meta["rows_in"] == meta["rows_out"] + sum(meta["dropped"].values())
    assert list(ev["event_type"]) == ["click", "checkout", "click", "click", "add_to_cart"]
    assert list(ev["timestamp"] - T0) == [0, 60, 120, 1, 500]  # ms -> s
    assert list(ev["surface"]) == ["home", "home", "search", "related", "home"]
    # user 1's view waits 60 s for the next event; user 2's view 1 s (the dropped "del" at 2 s
    # is still the user's next action); the second view of user 1 is its last event -> 0
    assert list(ev["click_duration"]) == [60, 0, 0, 1, 0]
    # the advertiser: the item's most frequent shop, case- and space-insensitive; none -> 0
    items = out["items"].to_pandas().set_index("item_id")
    assert items.loc[10, "advertiser_id"] == hashed_id("shop", "acme") and items.loc[12, "advertiser_id"] == 0
    assert meta["imputed"]["column_6_missing"] == 1
    assert list(items["category_id"]) == [5, 6, 6]
    # no content vectors in the mapping: the item table has none, and the pipeline accepts that
    assert "content_emb" not in out["items"].column_names
    table = ItemTable.from_arrow(out["items"])
    assert table.content_dim == 0 and table.dense.shape == (3, 0)
    counts = np.ones((1, len(COUNT_KINDS)), np.int64)
    assert table.with_stats(np.array([10]), counts).dense.shape == (3, 6)  # ids and stats only


def test_bad_row_names_its_line(tmp_path):
    rows = [(u, i, c, e, T0 * 1000 + ms, s, a) for u, i, c, e, ms, s, a in ROWS]
    rows[2] = (1, 11, 6, "wishlist", T0 * 1000, "s", "Bolt")
    path = _csv(tmp_path, rows)
    with pytest.raises(ConversionError) as e:
        convert_log(path, MAPPING)
    msg = str(e.value)
    assert path in msg and "column 3" in msg and "'wishlist' at line 3" in msg and "del -> dropped" in msg
    rows[2] = (1, -11, 6, "pv", T0 * 1000, "s", "Bolt")
    with pytest.raises(ConversionError, match=r"column 1' has 1 of 6 rows that are not non-negative integer ids, "
                                              r"e\.g\. '-11' at line 3"):
        convert_log(_csv(tmp_path, rows), MAPPING)
    rows[2] = (1, 11, 6, "pv", "yesterday", "s", "Bolt")
    with pytest.raises(ConversionError, match=r"column 4' has 1 of 6 rows that are not numbers, e\.g\. 'yesterday' "
                                              r"at line 3"):
        convert_log(_csv(tmp_path, rows), MAPPING)
    rows[2] = (1, 11, 6, "pv", T0 * 1000, "x", "Bolt")
    with pytest.raises(ConversionError, match=r"unknown surface, e\.g\. 'x' at line 3"):
        convert_log(_csv(tmp_path, rows), MAPPING)


def test_missing_values_drop_or_impute_and_are_counted(tmp_path):
    rows = [(u, i, c, e, T0 * 1000 + ms, s, a) for u, i, c, e, ms, s, a in ROWS]
    rows[0] = ("", 10, 5, "pv", T0 * 1000, "h", "Acme")   # no user: dropped
    rows[2] = (1, 11, "", "pv", T0 * 1000, "s", "Bolt")   # no category (missing: drop)
    meta = convert_log(_csv(tmp_path, rows), MAPPING)["meta"]
    assert meta["dropped"]["missing_column_0"] == 1 and meta["dropped"]["missing_column_2"] == 1
    assert meta["rows_in"] == 6 == meta["rows_out"] + sum(meta["dropped"].values())


def test_parquet_with_names_and_string_times(tmp_path):
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({
        "visitor": ["u1", "u2", "u1"], "sku": ["A-1", "B-2", "A-1"], "kind": ["View", "view", "Purchase"],
        "at": ["2024-03-01 10:00:00", "2024-03-01 10:00:05", "2024-03-01 10:01:00"],
    }), path)
    mapping = {"name": "pq", "ids": "hash", "columns": {"user_id": "visitor", "item_id": "sku", "event_type": "kind"},
               "event_types": {"view": "click", "purchase": "checkout"}, "lowercase_event_types": True,
               "timestamp": {"column": "at", "format": "%Y-%m-%d %H:%M:%S"}}
    out = convert_log(str(path), mapping)
    ev = out["events"].to_pandas()
    assert list(ev["event_type"]) == ["click", "click", "checkout"]
    assert ev["timestamp"].iloc[0] == 1709287200  # 2024-03-01T10:00:00Z
    assert ev["user_id"].iloc[0] == ev["user_id"].iloc[2] == hashed_id("user", "u1")
    assert ev["item_id"].iloc[0] == hashed_id("item", "A-1") != ev["item_id"].iloc[1]
    assert (ev["advertiser_id"] == 0).all() and out["meta"]["has_click_duration"] is False
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"visitor": ["u1"], "sku": ["A"], "kind": ["view"], "at": ["01/03/2024"]}), bad)
    with pytest.raises(ConversionError, match=r"bad\.parquet: column 'at' has 1 of 1 rows that are not timestamps .* "
                                              r"'01/03/2024' at row 0"):
        convert_log(str(bad), mapping)


def test_mapping_errors_are_clear(tmp_path):
    path = _csv(tmp_path, [(1, 2, 3, "pv", T0)])
    with pytest.raises(ConversionError, match=r"unknown key\(s\) \['colums'\]"):
        load_mapping({**MAPPING, "colums": {}})
    with pytest.raises(ConversionError, match=r"event_types \{'pv': 'view'\}: expected one of"):
        load_mapping({**MAPPING, "event_types": {"pv": "view"}})
    with pytest.raises(ConversionError, match=r"neither a file nor a preset; presets: \[.*'rees46'.*'tmall'"):
        load_mapping("no_such_format")
    with pytest.raises(ConversionError, match=r"columns.item_id = 9: the file has 5 columns"):
        convert_log(path, {**MAPPING, "columns": {"user_id": 0, "item_id": 9, "event_type": 3},
                           "category": None, "surface": "home", "advertiser": None})
    header = tmp_path / "h.csv"
    header.write_text("user,item,type,ts\n1,2,pv,5\n")
    with pytest.raises(ConversionError, match=r"missing required column 'product' \(or 'sku'\) for item_id"):
        convert_log(str(header), {"name": "h", "columns": {"user_id": "user", "item_id": ["product", "sku"],
                                                           "event_type": "type"},
                                  "event_types": {"pv": "click"}, "timestamp": {"column": "ts"}})


def test_taobao_preset_through_the_cli(tmp_path, capsys):
    # the Taobao UserBehavior layout: user, item, category, behaviour, unix seconds; no header
    rows = [(7, 100 + k % 5, 3, ("pv", "fav", "cart", "buy")[k % 4], T0 + 3600 * k) for k in range(40)]
    out = tmp_path / "data"
    assert convert_main(["mapping=taobao_user_behavior", f"input={_csv(tmp_path, rows)}", f"out_dir={out}"]) == 0
    text = capsys.readouterr().out
    assert "read 40 rows" in text and "content_emb: none" in text and "every item's advertiser is 0" in text
    meta = json.loads((out / "meta.json").read_text())
    assert meta["event_types"] == {"impression": 0, "click": 10, "save": 10, "add_to_cart": 10, "checkout": 10}
    assert "content_emb" not in pq.read_schema(out / "items.parquet").names
    assert meta["n_train_events"] + meta["n_eval_events"] == 40
    # a mapping that derives no durations cannot take session_gap_cap
    assert convert_main(["mapping=tmall", f"input={_csv(tmp_path, rows)}", f"out_dir={tmp_path / 'x'}",
                         "session_gap_cap=60"]) == 2
    assert "does not derive click durations" in capsys.readouterr().err


def test_written_dir_round_trips(tmp_path):
    rows = [(u, i, c, e, T0 * 1000 + ms, s, a) for u, i, c, e, ms, s, a in ROWS]
    meta = write_data_dir(convert_log(_csv(tmp_path, rows), MAPPING), str(tmp_path / "out"), cutoff_ts=T0 + 100)
    assert meta["n_train_events"] == 3 and meta["n_eval_events"] == 2
    # the checkout at 60 s is attributed to the view at 0 s (last click of the same item)
    train = pq.read_table(tmp_path / "out" / "events" / "train").to_pandas().sort_values("timestamp")
    assert list(train["request_ts"]) == [-1, -1, T0]


def test_cold_positives_are_left_out_for_a_corpus_derived_from_the_log(tmp_path):
    from raycg.eval.queries import build_queries, corpus_from_log, drop_cold, drop_cold_positives

    rows = [(u, i, c, e, T0 * 1000 + ms, s, a) for u, i, c, e, ms, s, a in ROWS]
    out = tmp_path / "out"
    write_data_dir(convert_log(_csv(tmp_path, rows), MAPPING), str(out), cutoff_ts=T0 + 100)
    items = str(out / "items.parquet")
    assert corpus_from_log(items) and drop_cold("auto", items) and not drop_cold("keep", items)
    assert not drop_cold("auto", str(tmp_path / "catalogue" / "items.parquet"))  # no meta.json: a catalogue
    with pytest.raises(ValueError, match="eval.cold_items"):
        drop_cold("sometimes", items)
    # the eval window: user 1 views item 11 and user 2 adds item 12 to the cart; of the three
    # items only 10 had a training event
    evaluation = pq.read_table(out / "events" / "eval")
    queries, positives = build_queries(evaluation, "engagement")
    assert [p.tolist() for p in positives] == [[11]]
    kept_q, kept_p, dropped = drop_cold_positives(queries, positives, np.array([10]))
    assert kept_q.num_rows == 0 and kept_p == [] and dropped == {"positives": 1, "queries": 1}
    kept_q, kept_p, dropped = drop_cold_positives(queries, positives, np.array([10, 11]))
    assert kept_q.num_rows == 1 and [p.tolist() for p in kept_p] == [[11]] and dropped["positives"] == 0
