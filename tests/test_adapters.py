"""Format adapters (raycg.data.adapters, python -m raycg.convert).

Real-sample tests read ../shared/data/real/ (research-use licences: never copied into the
repository) and skip when it is absent. The synthetic CSVs below are made-up values.
"""
import glob
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycg.convert import main as convert_main
from raycg.data.adapters import (
    ConversionError,
    brand_advertiser_id,
    quantile_cutoff,
    rees46_to_events,
    session_durations,
    tmall_to_events,
    write_data_dir,
)
from raycg.data.batches import ItemTable
from raycg.data.schema import ITEM_COLUMNS, check_parquet_files, check_values

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(ROOT, "..", "shared", "data", "real")
TMALL_CSV = os.path.join(REAL, "tmall_user_log_10k", "user_log.csv")
REES46_CSV = os.path.join(REAL, "rees46_2019oct_head10k", "sample.csv")

TMALL_MAP = {0: "click", 1: "add_to_cart", 2: "checkout", 3: "save"}
REES46_MAP = {"view": "click", "cart": "add_to_cart", "purchase": "checkout"}


def _need(path):
    if not os.path.exists(path):
        pytest.skip(f"real sample not available: {path}")


def _read_split(out_dir, split):
    paths = sorted(glob.glob(os.path.join(out_dir, "events", split, "*.parquet")))
    return paths, pa.concat_tables([pq.read_table(p) for p in paths])


def _check_written(out_dir, meta):
    train_paths, train = _read_split(out_dir, "train")
    eval_paths, evaluation = _read_split(out_dir, "eval")
    assert check_parquet_files(train_paths) == train.num_rows == meta["n_train_events"]
    assert check_parquet_files(eval_paths) == evaluation.num_rows == meta["n_eval_events"]
    for p in train_paths + eval_paths:
        check_values(pq.read_table(p), p)
    items_path = os.path.join(out_dir, "items.parquet")
    check_parquet_files([items_path], ITEM_COLUMNS)
    items = ItemTable.read(items_path)  # the pipeline's own item-table checks
    items.rows(train.column("item_id").to_numpy(), "train")
    items.rows(evaluation.column("item_id").to_numpy(), "eval")
    # strictly by time
    cutoff = meta["cutoff_ts"]
    assert train.column("timestamp").to_numpy().max() < cutoff <= evaluation.column("timestamp").to_numpy().min()
    assert train.num_rows + evaluation.num_rows == meta["rows_out"]
    with open(os.path.join(out_dir, "meta.json")) as f:
        on_disk = json.load(f)
    assert on_disk["cutoff_ts"] == cutoff and on_disk["rows_in"] == meta["rows_in"]
    return train, evaluation


# ----------------------------------------------------------------------------- real samples


@pytest.fixture(scope="module")
def tmall(tmp_path_factory):
    _need(TMALL_CSV)
    out = str(tmp_path_factory.mktemp("tmall"))
    result = tmall_to_events(TMALL_CSV)
    meta = write_data_dir(result, out)
    return result, meta, out


@pytest.fixture(scope="module")
def rees46(tmp_path_factory):
    _need(REES46_CSV)
    out = str(tmp_path_factory.mktemp("rees46"))
    result = rees46_to_events(REES46_CSV, session_gap_cap_s=300)
    meta = write_data_dir(result, out)
    return result, meta, out


def test_tmall_real_sample(tmall):
    result, meta, out = tmall
    raw = pd.read_csv(TMALL_CSV)
    train, evaluation = _check_written(out, meta)
    assert meta["rows_in"] == len(raw)
    assert meta["rows_in"] == meta["rows_out"] + sum(meta["dropped"].values())
    # no required id is missing in the sample; at day resolution a same-day repeat of an action
    # on the same item is one event (exact duplicate): only those are dropped
    repeat = raw.duplicated(subset=["user_id", "item_id", "action", "month", "day"]).to_numpy()
    assert sum(meta["dropped"].values()) == meta["dropped"]["duplicate"] == int(repeat.sum()) > 0
    assert meta["imputed"]["brand_id_missing"] == int(raw["brand_id"].isna().sum())
    assert "province" in meta["ignored_columns"]
    assert "province" not in pq.read_table(os.path.join(out, "users.parquet")).column_names
    raw = raw[~repeat].reset_index(drop=True)
    ev = result["events"].to_pandas()  # input order minus the repeats -> aligned with raw
    assert (ev["user_id"].to_numpy() == raw["user_id"].to_numpy()).all()
    assert (ev["item_id"].to_numpy() == raw["item_id"].to_numpy()).all()
    assert list(ev["event_type"]) == [TMALL_MAP[a] for a in raw["action"]]
    for i in np.random.default_rng(0).choice(len(raw), 20, replace=False):
        row = raw.iloc[i]
        assert ev["event_type"].iloc[i] == TMALL_MAP[int(row["action"])]
        expect = pd.Timestamp(year=2015, month=int(row["month"]), day=int(row["day"]), tz="UTC")
        assert ev["timestamp"].iloc[i] == int(expect.timestamp())
        assert ev["advertiser_id"].iloc[i] == row["merchant_id"]
    counts = raw["action"].map(TMALL_MAP).value_counts().to_dict()  # after the repeats are dropped
    assert {k: v for k, v in meta["event_types"].items() if v} == counts
    assert (ev["click_duration"] == 0).all() and (ev["surface"] == "home").all()
    assert meta["marginals"]["median_click_duration_s"] is None
    assert 0.1 < meta["n_eval_events"] / meta["rows_out"] < 0.3


def test_rees46_real_sample(rees46):
    result, meta, out = rees46
    raw = pd.read_csv(REES46_CSV)
    train, evaluation = _check_written(out, meta)
    assert meta["rows_in"] == len(raw)
    assert meta["rows_in"] == meta["rows_out"] + sum(meta["dropped"].values())
    assert meta["dropped"]["remove_from_cart"] == int((raw["event_type"] == "remove_from_cart").sum())
    assert meta["imputed"]["brand_missing"] == int(raw["brand"].isna().sum())
    kept = raw[raw["event_type"] != "remove_from_cart"]
    # an exact repeat (same second, user, product and type; in this sample the repeats also get
    # the same click duration, so every raycg column is equal) is one event
    repeat = kept.duplicated(subset=["event_time", "event_type", "product_id", "user_id"]).to_numpy()
    assert meta["dropped"]["duplicate"] == int(repeat.sum())
    kept = kept[~repeat].reset_index(drop=True)
    ev = result["events"].to_pandas()
    assert list(ev["event_type"]) == list(kept["event_type"].map(REES46_MAP))
    assert (ev["item_id"].to_numpy() == kept["product_id"].to_numpy()).all()
    ts = pd.to_datetime(kept["event_time"].str.replace(" UTC", ""), utc=True)
    epoch = pd.Timestamp(0, tz="UTC")
    assert (ev["timestamp"].to_numpy() == ((ts - epoch) // pd.Timedelta(seconds=1)).to_numpy()).all()
    # advertiser = hashed brand, 0 for no brand
    for i in np.random.default_rng(1).choice(len(kept), 20, replace=False):
        b = kept["brand"].iloc[i]
        assert ev["advertiser_id"].iloc[i] == (0 if pd.isna(b) else brand_advertiser_id(b))
    # durations: non-negative, capped, only on clicks; spot-check against pandas
    d = ev["click_duration"].to_numpy()
    assert (d >= 0).all() and (d <= 300).all()
    assert (d[ev["event_type"].to_numpy() != "click"] == 0).all()
    kept_ts = ev["timestamp"].to_numpy()
    clicks = np.flatnonzero(ev["event_type"].to_numpy() == "click")
    for i in np.random.default_rng(2).choice(clicks, 50, replace=False):
        same = raw[(raw["user_id"] == kept["user_id"].iloc[i]) & (raw["user_session"] == kept["user_session"].iloc[i])]
        same_ts = pd.to_datetime(same["event_time"].str.replace(" UTC", ""), utc=True)
        later = ((same_ts - epoch) // pd.Timedelta(seconds=1)).to_numpy()
        later = later[later > kept_ts[i]]
        expect = min(later.min() - kept_ts[i], 300) if len(later) else 0
        assert d[i] == expect
    assert meta["marginals"]["median_click_duration_s"] is not None
    assert meta["clicks_at_cap"] == int((d[clicks] >= 300).sum())


def test_cli_real_sample(tmp_path, capsys):
    _need(TMALL_CSV)
    out = tmp_path / "t"
    assert convert_main(["mapping=tmall", f"input={TMALL_CSV}", f"out_dir={out}", "shards=3", "eval_fraction=0.3"]) == 0
    text = capsys.readouterr().out
    assert "read 9,999 rows" in text and "loss.duration_weighting=auto" in text
    assert len(glob.glob(str(out / "events" / "train" / "*.parquet"))) == 3
    # a second run into the same directory refuses unless overwrite=true
    assert convert_main(["mapping=tmall", f"input={TMALL_CSV}", f"out_dir={out}"]) == 2
    assert "already holds" in capsys.readouterr().err
    assert convert_main(["mapping=tmall", f"input={TMALL_CSV}", f"out_dir={out}", "overwrite=true"]) == 0
    assert len(glob.glob(str(out / "events" / "train" / "*.parquet"))) == 2


# ----------------------------------------------------------------------------- synthetic CSVs

TMALL_HEADER = "user_id,item_id,cat_id,merchant_id,brand_id,month,day,action,age_range,gender,province\n"
REES46_HEADER = "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n"


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _tmall_rows():
    return [
        "7,100,5,40,9,06,01,0,3,1,x",
        "7,100,5,40,9,06,01,3,3,1,y",
        "7,101,6,41,,06,02,2,3,1,x",
        "8,100,5,40,9,06,03,1,,2,z",
        "8,102,5,42,10,06,04,0,4,0,x",
        "9,101,6,41,11,06,05,0,2,1,y",
    ]


def test_tmall_synthetic_mapping_and_split(tmp_path):
    path = _write(tmp_path, "log.csv", TMALL_HEADER + "\n".join(_tmall_rows()) + "\n")
    result = tmall_to_events(path)
    ev = result["events"].to_pandas()
    assert list(ev["event_type"]) == ["click", "save", "checkout", "add_to_cart", "click", "click"]
    assert ev["timestamp"].iloc[0] == 1433116800  # 2015-06-01T00:00:00Z
    assert result["meta"]["imputed"]["brand_id_missing"] == 1
    users = result["users"].to_pandas().set_index("user_id")
    assert users.loc[8, "age_range"] == 4 and users.loc[7, "gender"] == 1
    items = result["items"].to_pandas().set_index("item_id")
    assert items.loc[101, "brand_id"] == 11  # the present brand wins over the missing one
    # same category + brand -> same proxy embedding; deterministic across runs
    again = tmall_to_events(path)["items"].column("content_emb").to_pylist()
    assert again == result["items"].column("content_emb").to_pylist()
    meta = write_data_dir(result, str(tmp_path / "out"), eval_fraction=0.34)
    _check_written(str(tmp_path / "out"), meta)
    assert meta["cutoff_ts"] == 1433116800 + 3 * 86400  # 06-04: 2 of 6 events at/after


def test_tmall_original_column_names(tmp_path):
    text = ("user_id,item_id,cat_id,seller_id,brand_id,time_stamp,action_type\n"
            "1,2,3,4,5,1111,2\n1,3,3,4,5,0829,0\n")
    ev = tmall_to_events(_write(tmp_path, "format1.csv", text))["events"].to_pandas()
    assert list(ev["event_type"]) == ["checkout", "click"]
    assert list(ev["timestamp"]) == [1447200000, 1440806400]  # 2015-11-11, 2015-08-29


def test_tmall_missing_ids_are_dropped_and_counted(tmp_path):
    rows = _tmall_rows() + [",100,5,40,9,06,06,0,1,1,x", "9,,5,40,9,06,06,0,1,1,x", "9,100,5,40,9,,06,0,1,1,x"]
    result = tmall_to_events(_write(tmp_path, "log.csv", TMALL_HEADER + "\n".join(rows) + "\n"))
    meta = result["meta"]
    assert meta["dropped"]["missing_user_id"] == 1
    assert meta["dropped"]["missing_item_id"] == 1
    assert meta["dropped"]["missing_month"] == 1
    assert meta["rows_in"] == 9 == meta["rows_out"] + sum(meta["dropped"].values())


def test_tmall_bad_action_code(tmp_path):
    rows = _tmall_rows()
    rows[4] = "8,102,5,42,10,06,04,7,4,0,x"
    path = _write(tmp_path, "bad_action.csv", TMALL_HEADER + "\n".join(rows) + "\n")
    with pytest.raises(ConversionError) as e:
        tmall_to_events(path)
    msg = str(e.value)
    assert path in msg and "'action'" in msg and "'7'" in msg and "line 6" in msg and "1 of 6" in msg


def test_tmall_bad_values(tmp_path):
    rows = _tmall_rows()
    rows[1] = "7,-100,5,40,9,06,01,3,3,1,y"
    with pytest.raises(ConversionError, match=r"bad_id\.csv: column 'item_id' has 1 of 6 rows .* e\.g\. '-100'"):
        tmall_to_events(_write(tmp_path, "bad_id.csv", TMALL_HEADER + "\n".join(rows) + "\n"))
    rows = _tmall_rows()
    rows[2] = "7,101,6,41,,02,30,2,3,1,x"
    with pytest.raises(ConversionError, match=r"bad_date\.csv: column\(s\) 'month', 'day' .* month 2 day 30 at line 4"):
        tmall_to_events(_write(tmp_path, "bad_date.csv", TMALL_HEADER + "\n".join(rows) + "\n"))


def test_missing_column(tmp_path):
    path = _write(tmp_path, "no_merchant.csv", "user_id,item_id,cat_id,brand_id,month,day,action\n1,2,3,4,5,6,0\n")
    with pytest.raises(ConversionError, match=r"no_merchant\.csv: missing required column 'merchant_id' \(or 'seller_id'\)"):
        tmall_to_events(path)
    path = _write(tmp_path, "no_session.csv", REES46_HEADER.replace(",user_session", "")
                  + "2019-10-01 00:00:00 UTC,view,1,2,,,1.0,3\n")
    with pytest.raises(ConversionError, match=r"no_session\.csv: missing required column 'user_session'"):
        rees46_to_events(path)
    with pytest.raises(ConversionError, match="no such file"):
        rees46_to_events(str(tmp_path / "absent.csv"))


def test_rees46_unknown_event_type(tmp_path):
    text = REES46_HEADER + (
        "2019-10-01 00:00:00 UTC,view,1,2,a.b,acme,1.0,3,s1\n"
        "2019-10-01 00:00:05 UTC,wishlist,1,2,a.b,acme,1.0,3,s1\n")
    path = _write(tmp_path, "events.csv", text)
    with pytest.raises(ConversionError) as e:
        rees46_to_events(path)
    msg = str(e.value)
    assert path in msg and "'event_type'" in msg and "'wishlist' at line 3" in msg and "remove_from_cart" in msg
    bad_time = REES46_HEADER + "01/10/2019 00:00,view,1,2,a.b,acme,1.0,3,s1\n"
    with pytest.raises(ConversionError, match=r"column 'event_time' has 1 of 1 rows .* '01/10/2019 00:00'"):
        rees46_to_events(_write(tmp_path, "bad_time.csv", bad_time))


def test_rees46_hand_made_session(tmp_path):
    # user 3, session s1: view 0 s, view 10 s, cart 10 s (same second, so the view's gap runs to
    # 700 s: 690 -> capped at 300), view 700 s, remove_from_cart 800 s (dropped, but still the
    # user's next action: gap 100), purchase 810 s (session end). user 3, session s2: a single
    # view (last event -> 0). user 4 reuses the session id s1 (a separate session).
    rows = [
        ("2019-10-01 00:00:00 UTC", "view", 1, 3, "s1"),
        ("2019-10-01 00:00:10 UTC", "view", 2, 3, "s1"),
        ("2019-10-01 00:00:10 UTC", "cart", 2, 3, "s1"),
        ("2019-10-01 00:11:40 UTC", "view", 1, 3, "s1"),
        ("2019-10-01 00:13:20 UTC", "remove_from_cart", 2, 3, "s1"),
        ("2019-10-01 00:13:30 UTC", "purchase", 1, 3, "s1"),
        ("2019-10-01 00:20:00 UTC", "view", 2, 3, "s2"),
        ("2019-10-01 00:00:03 UTC", "view", 2, 4, "s1"),
        ("2019-10-01 00:00:04 UTC", "view", 1, 4, "s1"),
        ("2019-10-01 00:00:20 UTC", "view", 1, 3, ""),  # no session -> kept, duration 0
    ]
    text = REES46_HEADER + "".join(
        f"{t},{e},{p},2053013552326770905,a.b.c,{'acme' if p == 1 else ''},{p * 10.5},{u},{s}\n"
        for t, e, p, u, s in rows)
    result = rees46_to_events(_write(tmp_path, "session.csv", text), session_gap_cap_s=300)
    meta = result["meta"]
    assert meta["dropped"]["remove_from_cart"] == 1
    assert meta["rows_in"] == 10 == meta["rows_out"] + sum(meta["dropped"].values())
    assert meta["imputed"]["user_session_missing"] == 1 and meta["imputed"]["brand_missing"] == 4
    ev = result["events"].to_pandas()
    assert list(ev["event_type"]) == ["click", "click", "add_to_cart", "click", "checkout",
                                      "click", "click", "click", "click"]
    assert list(ev["click_duration"]) == [10, 300, 0, 100, 0, 0, 1, 0, 0]
    items = result["items"].to_pandas().set_index("item_id")
    assert items.loc[1, "advertiser_id"] == brand_advertiser_id("acme") and items.loc[2, "advertiser_id"] == 0
    assert items.loc[1, "category_id"] == 2053013552326770905  # exact: no float round trip
    emb = np.stack(items["content_emb"].to_numpy())
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_session_durations_order_independent():
    user = np.array([1, 1, 1, 1, 2, 2])
    sess = np.array([0, 0, 0, 0, 1, 1])
    ts = np.array([100, 100, 130, 1000, 5, 5])
    d = session_durations(user, sess, ts, cap_s=60)
    assert list(d) == [30, 30, 60, 0, 0, 0]
    perm = np.random.default_rng(0).permutation(6)
    assert list(session_durations(user[perm], sess[perm], ts[perm], 60)) == list(d[perm])


def test_quantile_cutoff_and_bad_cutoff(tmp_path):
    ts = np.array([1, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert quantile_cutoff(ts, 0.2) == 8
    with pytest.raises(ConversionError, match="one timestamp"):
        quantile_cutoff(np.array([5, 5]), 0.2)
    path = _write(tmp_path, "log.csv", TMALL_HEADER + "\n".join(_tmall_rows()) + "\n")
    with pytest.raises(ConversionError, match="leaves no eval events"):
        write_data_dir(tmall_to_events(path), str(tmp_path / "out"), cutoff_ts=2_000_000_000)


def test_last_click_attribution_golden():
    from raycg.data.adapters import attribute_last_click

    t0 = 1_433_116_800
    rows = [  # user, item, type, t, surface, context
        (1, 7, "click", 100, "related", 55), (1, 7, "click", 300, "search", -1), (1, 7, "checkout", 400, "home", -1),
        (1, 8, "checkout", 400, "home", -1),                        # no click of item 8: its own request
        (2, 7, "click", 0, "related", 3), (2, 7, "add_to_cart", 10_000, "home", -1),  # outside the window
        (1, 7, "add_to_cart", 300, "home", -1),                     # same second as a click: attributed
    ]
    u, i, e, t, s, c = zip(*rows)
    events = pa.table({"user_id": pa.array(u, pa.int64()), "item_id": pa.array(i, pa.int64()),
                       "advertiser_id": pa.array([0] * len(u), pa.int64()), "surface": list(s), "event_type": list(e),
                       "click_duration": pa.array([1.0] * len(u), pa.float32()),
                       "timestamp": pa.array([t0 + x for x in t], pa.int64()),
                       "context_item_id": pa.array(c, pa.int64()), "query_id": pa.array([-1] * len(u), pa.int64())})
    out, counts = attribute_last_click(events, window_s=3600)
    req = [x - t0 if x >= 0 else -1 for x in out.column("request_ts").to_pylist()]
    assert req == [-1, -1, 300, -1, -1, -1, 300]
    assert out.column("surface").to_pylist() == ["related", "search", "search", "home", "related", "home", "search"]
    assert counts == {"conversions": 4, "attributed": 2, "window_s": 3600}
