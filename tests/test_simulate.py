"""The simulator: deterministic, realistic marginals, a clean time split, planted effects."""
import platform

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from raycg.data.datadir import time_split
from raycg.data.schema import check_parquet_files
from raycg.data.simulate import SimConfig, simulate, write_dataset

SMALL = dict(n_users=800, n_items=600, n_advertisers=40, n_categories=12, requests_per_user=12)


@pytest.fixture(scope="module")
def sim():
    return simulate(SimConfig(seed=3, **SMALL))


def test_deterministic_by_seed(sim):
    again = simulate(SimConfig(seed=3, **SMALL))
    assert again["events"].equals(sim["events"]) and again["items"].equals(sim["items"])
    other = simulate(SimConfig(seed=4, **SMALL))
    assert not other["events"].equals(sim["events"])


def test_marginals_look_like_shopping_logs(sim):
    m = sim["meta"]
    ctr = m["n_clicks"] / m["n_impressions_shown"]
    assert 0.02 < ctr < 0.15
    assert 0.01 <= m["conversion_per_click"] <= 0.06  # conversions are rare


def test_planted_clickbait_and_duration_effects():
    out = simulate(SimConfig(seed=1, n_users=3000, n_items=1500, n_advertisers=60, n_categories=15,
                             requests_per_user=15, clickbait_frac=0.1))
    ev = out["events"]
    et = ev.column("event_type").to_numpy(zero_copy_only=False)
    item = ev.column("item_id").to_numpy()
    shown = np.bincount(item[np.isin(et, ["impression", "click"])], minlength=1500)
    clicks = np.bincount(item[et == "click"], minlength=1500)
    convs = np.bincount(item[np.isin(et, ["add_to_cart", "checkout"])], minlength=1500)
    # identify click-bait by the planted knob: the top-CTR decile converts worse per click
    ctr = clicks / np.maximum(shown, 1)
    top = ctr >= np.quantile(ctr, 0.9)
    conv_per_click_top = convs[top].sum() / clicks[top].sum()
    conv_per_click_rest = convs[~top].sum() / clicks[~top].sum()
    assert conv_per_click_top < conv_per_click_rest
    dur = ev.column("click_duration").to_numpy()[et == "click"]
    # a bimodal duration: many short accidental clicks and many long genuine ones
    assert (dur < 8).mean() > 0.2 and (dur > 20).mean() > 0.2


def test_time_split_and_written_layout(tmp_path):
    meta = write_dataset(SimConfig(seed=0, **SMALL), str(tmp_path))
    train_files = sorted((tmp_path / "events" / "train").glob("*.parquet"))
    eval_files = sorted((tmp_path / "events" / "eval").glob("*.parquet"))
    assert len(train_files) == 4 and len(eval_files) == 2
    n_train = check_parquet_files([str(f) for f in train_files])
    n_eval = check_parquet_files([str(f) for f in eval_files])
    assert n_train + n_eval == meta["n_events"]
    # what generated it: one seed's events differ slightly across machines (docs/simulator.md)
    assert meta["generated_with"] == {"numpy": np.__version__, "machine": platform.machine()}
    train = pq.read_table(tmp_path / "events" / "train")
    evaluation = pq.read_table(tmp_path / "events" / "eval")
    assert pc.max(train["timestamp"]).as_py() < meta["cutoff_ts"] <= pc.min(evaluation["timestamp"]).as_py()
    items = pq.read_table(tmp_path / "items.parquet")
    assert items.num_rows == SMALL["n_items"] and items.schema.field("content_emb").type.list_size == 16
    # every event's advertiser is its item's advertiser
    adv = items.column("advertiser_id").to_numpy()
    assert (adv[train.column("item_id").to_numpy()] == train.column("advertiser_id").to_numpy()).all()


def test_time_split_is_strict():
    ev = simulate(SimConfig(seed=0, **SMALL))["events"]
    cut = int(np.median(ev.column("timestamp").to_numpy()))
    a, b = time_split(ev, cut)
    assert a.num_rows + b.num_rows == ev.num_rows
    assert pc.max(a["timestamp"]).as_py() < cut <= pc.min(b["timestamp"]).as_py()


# --- scale-out path: user blocks simulated and written by Ray tasks ---------------------------

def _files(root, split):
    return sorted((root / "events" / split).glob("*.parquet"))


def test_path_choice_by_size():
    from raycg.data.simulate import use_parallel

    assert not use_parallel(SimConfig(**SMALL))
    assert not use_parallel(SimConfig(n_users=20000, requests_per_user=15))  # conf/data/sim_default: 3M
    assert use_parallel(SimConfig(n_users=200_000, requests_per_user=20))  # 40M impressions
    assert use_parallel(SimConfig(**SMALL), parallel=True)
    assert not use_parallel(SimConfig(n_users=200_000), parallel=False)


def test_parallel_path(ray_session, tmp_path):
    cfg = SimConfig(seed=5, users_per_block=300, **SMALL)  # 800 users -> 3 blocks
    a, b = tmp_path / "a", tmp_path / "b"
    meta = write_dataset(cfg, str(a), parallel=True)
    assert meta["parallel"]["n_blocks"] == 3 and meta["shards"] == {"train": 3, "eval": 3}

    # valid shards; meta counts are the rows in the files
    train_files, eval_files = _files(a, "train"), _files(a, "eval")
    assert len(train_files) == 3 and len(eval_files) == 3
    n_train = check_parquet_files([str(f) for f in train_files])
    n_eval = check_parquet_files([str(f) for f in eval_files])
    assert (n_train, n_eval) == (meta["n_train_events"], meta["n_eval_events"])
    assert n_train + n_eval == meta["n_events"]
    train, evaluation = pq.read_table(a / "events" / "train"), pq.read_table(a / "events" / "eval")
    et = np.concatenate([t.column("event_type").to_numpy(zero_copy_only=False) for t in (train, evaluation)])
    assert (et == "click").sum() == meta["n_clicks"]
    assert np.isin(et, ["add_to_cart", "checkout"]).sum() == meta["n_conversions"]
    assert np.isin(et, ["impression", "click"]).sum() == meta["n_impressions_shown"]

    # strict time split with the config's cutoff, in every block
    assert pc.max(train["timestamp"]).as_py() < meta["cutoff_ts"] <= pc.min(evaluation["timestamp"]).as_py()

    # block b holds exactly its own users; the world is the in-memory path's world
    for i, f in enumerate(train_files):
        users = pq.read_table(f, columns=["user_id"]).column("user_id").to_numpy()
        assert users.min() >= 300 * i and users.max() < min(300 * (i + 1), SMALL["n_users"])
    mem = simulate(SimConfig(seed=5, **SMALL))
    assert pq.read_table(a / "items.parquet").equals(mem["items"])
    assert pq.read_table(a / "users.parquet").equals(mem["users"])
    adv = mem["items"].column("advertiser_id").to_numpy()
    assert (adv[train.column("item_id").to_numpy()] == train.column("advertiser_id").to_numpy()).all()

    # marginals in the same range as the in-memory path
    ctr = meta["n_clicks"] / meta["n_impressions_shown"]
    mem_ctr = mem["meta"]["n_clicks"] / mem["meta"]["n_impressions_shown"]
    assert 0.02 < ctr < 0.15 and abs(ctr - mem_ctr) < 0.01
    assert 0.01 <= meta["conversion_per_click"] <= 0.06
    assert abs(meta["conversion_per_click"] - mem["meta"]["conversion_per_click"]) < 0.015

    # deterministic: a second run (into a dir holding another run's shards) gives the same files
    write_dataset(SimConfig(seed=5, users_per_block=400, **SMALL), str(b), parallel=True)  # 2 blocks
    assert len(_files(b, "train")) == 2
    meta_b = write_dataset(cfg, str(b), parallel=True)
    assert meta_b == meta
    for split in ("train", "eval"):
        fa, fb = _files(a, split), _files(b, split)
        assert [f.name for f in fa] == [f.name for f in fb]  # stale shards of the 2-block run removed
        for x, y in zip(fa, fb):
            assert pq.read_table(x).equals(pq.read_table(y))
    # another seed gives other events
    c = tmp_path / "c"
    meta_c = write_dataset(SimConfig(seed=6, users_per_block=300, **SMALL), str(c), parallel=True)
    assert meta_c["n_events"] != meta["n_events"] or not pq.read_table(c / "events" / "train").equals(train)


def test_parallel_path_plants_every_higher_order_effect(ray_session, tmp_path):
    # the scale-out path (data=sim_crossed from ~5M impressions up) runs the same effects in its
    # tasks: each is measured there, and its size matches the in-memory path's
    knobs = dict(order3_strength=1.0, complement_strength=2.5, complement_candidate_frac=0.3,
                 query_advertiser_strength=1.0, user_advertiser_strength=1.0, **SMALL)
    meta = write_dataset(SimConfig(seed=5, users_per_block=300, **knobs), str(tmp_path), parallel=True)
    mem = simulate(SimConfig(seed=5, **knobs))["meta"]["planted"]
    assert set(meta["planted"]) == set(mem) == {"segment_x_tier", "segment_x_tier_x_surface", "context_x_category",
                                                "query_x_advertiser", "user_x_advertiser"}
    for name, p in meta["planted"].items():
        assert min(p["impressions"]) > 0, name
        (fav_with, fav_without), _ = p["expected_conversions_per_genuine_click_with_without"]
        (mem_with, mem_without), _ = mem[name]["expected_conversions_per_genuine_click_with_without"]
        assert fav_with / fav_without == pytest.approx(mem_with / mem_without, rel=0.5), name
    with_ctr, without_ctr = meta["planted"]["context_x_category"]["expected_ctr_with_without"]
    assert with_ctr > 3 * without_ctr


def test_rewriting_with_fewer_shards_leaves_no_stale_files(tmp_path):
    write_dataset(SimConfig(seed=0, num_shards=4, **SMALL), str(tmp_path))
    meta = write_dataset(SimConfig(seed=1, num_shards=2, **SMALL), str(tmp_path))
    files = sorted(str(f) for f in (tmp_path / "events").rglob("*.parquet"))
    assert len(files) == 3  # 2 train + 1 eval shards, nothing left from the 4-shard run
    assert check_parquet_files(files) == meta["n_events"]


def test_cached_simulation_is_reused_only_for_the_same_knobs(tmp_path, capsys):
    import json

    from conftest import compose
    from raycg.train.driver import ensure_data

    base = ["data=sim_small", f"data.dir={tmp_path}", "data.sim.n_users=300", "data.sim.n_items=200"]
    ensure_data(compose(base))
    first = json.loads((tmp_path / "meta.json").read_text())
    ensure_data(compose(base))
    assert "reusing simulated dataset" in capsys.readouterr().out
    ensure_data(compose(base + ["data.sim.click_bias=-4.0"]))  # every SimConfig knob is in the yaml
    assert "simulating again" in capsys.readouterr().out
    second = json.loads((tmp_path / "meta.json").read_text())
    assert second["config"]["click_bias"] == -4.0 and second["n_clicks"] > first["n_clicks"]


def test_exact_duplicate_events_are_dropped_and_counted_first_kept():
    """Two requests of one user can show the same item at the same second: the simulator must
    not write that event twice (the data checks reject exact duplicates)."""
    import numpy as np

    from raycg.data.sim.events import _drop_exact_duplicates

    events = {
        "user_id": np.array([1, 2, 1, 1, 1, 3]),
        "item_id": np.array([7, 7, 7, 7, 7, 9]),
        "timestamp": np.array([100, 100, 100, 100, 100, 5]),
        "event_type": np.array([0, 0, 0, 0, 1, 0], dtype=np.int8),
        "click_duration": np.array([0.0, 0.0, 0.0, 2.5, 0.0, 0.0], dtype=np.float32),
        "row": np.array([0, 1, 0, 0, 0, 2]),  # rows 0 and 2 are equal in every column
    }
    out, dropped = _drop_exact_duplicates(events)
    assert dropped == 1
    # row 2 (the repeat) is gone; row 3 (differs only in click_duration) and row 4 (event type) stay
    assert out["click_duration"].tolist() == [0.0, 0.0, 2.5, 0.0, 0.0]
    assert out["event_type"].tolist() == [0, 0, 0, 1, 0]
    assert out["user_id"].tolist() == [1, 2, 1, 1, 3]
    same, none = _drop_exact_duplicates({k: v[[0, 1, 5]] for k, v in events.items()})
    assert none == 0 and same["user_id"].tolist() == [1, 2, 3]


# -- higher-order planted effects (issue 17; docs/simulator.md) ---------------------------------
MEDIUM = dict(seed=2, n_users=3000, n_items=1500, n_advertisers=60, n_categories=15, requests_per_user=15)
CONVERSIONS = ["add_to_cart", "checkout"]


def _is_conversion(ev):
    return pc.is_in(ev.column("event_type"), value_set=pa.array(CONVERSIONS))


def test_conversion_only_effects_leave_every_other_draw_alone():
    off = simulate(SimConfig(**MEDIUM))
    on = simulate(SimConfig(**MEDIUM, order3_strength=1.5, query_advertiser_strength=1.5,
                            user_advertiser_strength=1.5))
    assert on["items"].equals(off["items"]) and on["users"].equals(off["users"])
    # impressions, clicks and saves are the same rows; only conversions move
    rest = [out["events"].filter(pc.invert(_is_conversion(out["events"]))) for out in (off, on)]
    assert rest[0].equals(rest[1])
    assert not off["events"].filter(_is_conversion(off["events"])).equals(
        on["events"].filter(_is_conversion(on["events"])))
    assert set(off["meta"]["planted"]) == {"segment_x_tier"}
    p = on["meta"]["planted"]
    for name in ("segment_x_tier_x_surface", "query_x_advertiser", "user_x_advertiser"):
        favoured, disfavoured = p[name]["conversions_per_click"]
        assert favoured > 2 * disfavoured, (name, p[name])
        (with_f, without_f), (with_d, without_d) = p[name]["expected_conversions_per_genuine_click_with_without"]
        assert with_f > without_f and with_d < without_d


def test_the_third_order_effect_is_invisible_in_every_pair():
    # conv logit +-s by the parity of (segment == tier, surface == home): each pair of the three
    # variables alone shows no difference; the three together show e^(2s)-ish
    out = simulate(SimConfig(**MEDIUM, cross_strength=0.0, order3_strength=1.5, advertiser_propensity_std=0.0))
    ev, items, users = out["events"], out["items"], out["users"]
    et = ev.column("event_type").to_numpy(zero_copy_only=False)
    seg = users.column("segment").to_numpy()[ev.column("user_id").to_numpy()]
    tier = items.column("tier").to_numpy()[ev.column("item_id").to_numpy()]
    home = ev.column("surface").to_numpy(zero_copy_only=False) == "home"
    click, conv = et == "click", np.isin(et, CONVERSIONS)

    def ratio(a):  # conversions per click where `a` vs where not
        return (conv & a).sum() / (click & a).sum() / ((conv & ~a).sum() / (click & ~a).sum())

    for pair in (seg == tier, home, seg == 1, tier == 1):
        assert 0.75 < ratio(pair) < 1.33, ratio(pair)
    assert ratio((seg == tier) != home) > 4


def test_brand_taste_is_shared_by_a_hidden_group_and_pooled_over_an_advertisers_items():
    # conv logit +-s by (hidden taste group, advertiser): per advertiser, users of one group convert
    # more often than the others on every item of it; the group is not among the user features
    out = simulate(SimConfig(**MEDIUM, cross_strength=0.0, advertiser_propensity_std=0.0,
                             user_advertiser_strength=1.5, user_taste_groups=2))
    assert out["users"].column_names == ["user_id", "segment"]
    with_qa = simulate(SimConfig(**MEDIUM, query_advertiser_strength=1.0))["meta"]["planted"]["query_x_advertiser"]
    both = simulate(SimConfig(**MEDIUM, query_advertiser_strength=1.0, user_advertiser_strength=1.5))
    assert both["meta"]["planted"]["query_x_advertiser"]["impressions"] == with_qa["impressions"]
    from raycg.data.sim.world import _make_world

    w = _make_world(SimConfig(**MEDIUM, user_advertiser_strength=1.5, user_taste_groups=2),
                    np.random.default_rng(2))
    ev = out["events"]
    et = ev.column("event_type").to_numpy(zero_copy_only=False)
    group = w["taste_group"][ev.column("user_id").to_numpy()]
    sign = w["taste_sign"][group, ev.column("advertiser_id").to_numpy()]
    click, conv = et == "click", np.isin(et, CONVERSIONS)
    rate = lambda a: (conv & a).sum() / (click & a).sum()  # noqa: E731
    assert rate(sign > 0) > 3 * rate(sign < 0)
    # half of the groups favour each advertiser: no advertiser-wide offset on top of its propensity
    assert (w["taste_sign"].sum(0) == 0).all() and set(np.unique(w["taste_sign"])) == {-1, 1}
    with pytest.raises(ValueError, match="user_taste_groups=0"):
        simulate(SimConfig(**MEDIUM, user_advertiser_strength=1.0, user_taste_groups=0))


def test_complements_on_the_related_surface_and_long_tails():
    on = simulate(SimConfig(**MEDIUM, complement_strength=2.5, complement_candidate_frac=0.3,
                            popularity_sigma=1.6, activity_sigma=1.3))
    p = on["meta"]["planted"]["context_x_category"]
    related = sum(p["impressions"])
    assert 0.3 < p["impressions"][0] / related < 0.4  # 30% drawn from the complement (+ the global draws)
    with_ctr, without_ctr = p["expected_ctr_with_without"]
    assert with_ctr > 3 * without_ctr and p["ctr"][0] > 0.5 * p["ctr"][1]

    def top_share(ev, col, n):  # events of the top 1% of ids
        counts = np.sort(np.bincount(ev.column(col).to_numpy(), minlength=n))[::-1]
        return counts[:n // 100].sum() / counts.sum()

    off = simulate(SimConfig(**MEDIUM))
    assert top_share(on["events"], "item_id", 1500) > 1.2 * top_share(off["events"], "item_id", 1500)
    assert top_share(on["events"], "user_id", 3000) > 1.2 * top_share(off["events"], "user_id", 3000)
