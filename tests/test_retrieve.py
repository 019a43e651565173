"""raycg.retrieve: the export holds everything retrieval needs (towers, feature tables, item
embeddings, the faiss index), returns the evaluation path's top-K for the evaluation queries,
and refuses broken exports and malformed requests with clear errors."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raycg.checksums import write_checksums
from raycg.data.batches import FeatureStore, ItemTable
from raycg.data.features import UserTable, stats_from_counts
from raycg.data.history import HistoryIndex
from raycg.data.spec import FeatureSpec
from raycg.eval.queries import TASKS, build_queries
from raycg.eval.recall import exact_top_k
from raycg.model.export import ExportError, load_towers, item_inputs, user_inputs
from raycg.model.two_tower import TwoTowerModel
from raycg.retrieve import RequestError, Retriever
from raycg.retrieve.requests import check_requests, request_table
from raycg.retrieve.build import embed_items, evaluation_requests, export_run, write_index
from raycg.retrieve.index import build_index, index_recall


def index_cfg(**overrides) -> dict:
    """raycg/conf/config.yaml's `index` block with `overrides`."""
    from omegaconf import OmegaConf

    from raycg.config import compose

    return {**OmegaConf.to_container(compose([]).index, resolve=True), **overrides}

N_ITEMS, N_USERS, D, L = 400, 80, 4, 4
def _model_cfg() -> dict:
    """The model group of raycg/conf (small sizes), with this world's buckets and vocabularies."""
    from omegaconf import OmegaConf

    from raycg.config import compose

    cfg = OmegaConf.to_container(compose([
        "model.cross_layers=1", "model.mlp_dims=[32,16]", "model.head_dims=[16]", "model.embedding_dim=16",
        "model.id_dim=8", "model.heads=multi_head", "model.vocab.oov_buckets=4", f"model.history.length={L}",
    ]).model, resolve=True)
    cfg["buckets"] = {"user": 50, "surface": 8, "context_item": 50, "query": 10, "item": 50, "advertiser": 10,
                      "category": 10, "age_range": 6}
    cfg["vocab_sizes"] = {"item": 300, "user": 60}
    return cfg


CFG = _model_cfg()


def _world(seed: int = 0):
    rng = np.random.default_rng(seed)
    item_ids = np.sort(rng.choice(2**40, N_ITEMS, replace=False)).astype(np.int64)  # sparse 64-bit ids
    cat = np.stack([item_ids, rng.integers(0, 20, N_ITEMS), rng.integers(0, 9, N_ITEMS)], 1).astype(np.int64)
    dense = rng.normal(size=(N_ITEMS, D + 6)).astype(np.float32)
    items = ItemTable(item_ids, cat, dense, content_dim=D)
    user_ids = np.sort(rng.choice(10**6, N_USERS, replace=False)).astype(np.int64)
    users = UserTable(user_ids, rng.normal(size=(N_USERS, 6)).astype(np.float32),
                      rng.integers(-1, 5, (N_USERS, 1)).astype(np.int64), ("age_range",))
    n = 3000
    surface = rng.choice(["home", "related", "search"], n)
    events = pa.table({
        "user_id": rng.choice(np.concatenate([user_ids, [10**7 + 1]]), n),  # one user not in the table
        "item_id": rng.choice(item_ids, n), "surface": surface,
        "event_type": rng.choice(["click", "save", "add_to_cart", "checkout"], n),
        "timestamp": rng.integers(1_700_000_000, 1_700_100_000, n),
        "context_item_id": np.where(surface == "related", rng.choice(item_ids, n), -1),
        "query_id": np.where(surface == "search", rng.integers(0, 30, n), -1)})
    store = FeatureStore(items=items, users=users)
    spec = FeatureSpec(user_cat=["user", "surface", "context_item", "query", "age_range"], user_dense=6 + D,
                       item_dense=D + 6, history_length=L, user_dense_mean=[0.1] * (6 + D),
                       user_dense_std=[2.0] * (6 + D))
    torch.manual_seed(seed)
    model = TwoTowerModel(CFG, spec).eval()
    model.set_vocabularies({"item": np.sort(rng.choice(item_ids, 300, replace=False)),
                            "user": np.sort(rng.choice(user_ids, 60, replace=False))})
    return model, store, events, HistoryIndex.from_events(events)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    model, store, events, history = _world()
    out = str(tmp_path_factory.mktemp("run") / "export")
    training_store = dataclasses.replace(store, history=history, history_length=L)  # as the driver's
    # new_users=model: every request through the towers (this world's user stats are random)
    export_run(model, training_store, out, index_cfg(recall_k=20, new_users="model"), eval_events=events,
               history=history, use_ray=False, log=lambda *_: None)
    return model, store, events, history, out


def _evaluation_top_k(model, store, history, events, k):
    """What raycg.eval does: FeatureStore.pack_users with the history index, exact faiss top-K."""
    store = dataclasses.replace(store, history=history, history_length=L)
    queries = pa.concat_tables([build_queries(events, t)[0] for t in TASKS])
    with torch.no_grad():
        packed = {n: torch.from_numpy(v) for n, v in store.pack_users(queries).items()}
        q = model.embed_users(packed).numpy()
        items = model.embed_items({n: torch.from_numpy(v) for n, v in store.items.pack().items()}).numpy()
    rows, _ = exact_top_k(items, q, k)
    return store.items.item_id[rows], q, items


def test_a_request_with_nothing_personal_gets_the_most_engaged_items(world, tmp_path):
    model, store, _, _, _ = world
    clicks = np.arange(N_ITEMS)  # item i clicked i times: the last items are the most engaged ...
    conversions = np.zeros(N_ITEMS)
    conversions[:2] = [100, 150]  # ... but items 0 and 1 converted: weighted 1.0 against 0.3 per click
    counts = np.stack([np.full(N_ITEMS, 50), clicks, np.zeros(N_ITEMS), conversions], 1)
    user_counts = np.ones((N_USERS, 4))
    user_counts[0] = 0  # in the users table (attributes) without a training-window event
    store = dataclasses.replace(
        store, items=dataclasses.replace(store.items, dense=np.concatenate(
            [store.items.dense[:, :D], stats_from_counts(counts)], 1)),
        users=dataclasses.replace(store.users, dense=stats_from_counts(user_counts)))
    out = str(tmp_path / "export")
    export_run(model, store, out, index_cfg(recall_k=20), use_ray=False, log=lambda *_: None,  # the default
               popularity_weights=(1.0, 0.3))  # the default loss's conversion and engagement weights
    meta = json.load(open(os.path.join(out, "index.json")))
    assert meta["new_users"] == "popularity" and meta["new_users_weights"] == {"conversion": 1.0, "engagement": 0.3}
    r = Retriever(out)
    known, blank, item = int(store.users.user_id[1]), int(store.users.user_id[0]), int(store.items.item_id[3])
    requests = request_table([
        {"user_id": 10**7 + 1, "surface": "home"},        # never seen
        {"user_id": blank, "surface": "home", "recent_item_ids": [], "recent_event_types": []},  # no event
        {"user_id": blank, "surface": "home", "recent_item_ids": [item], "recent_event_types": ["click"]},
        {"user_id": 10**7 + 1, "surface": "related", "context_item_id": item},
        {"user_id": known, "surface": "home", "recent_item_ids": [], "recent_event_types": []}])
    ids, scores = r.search(requests, 5)
    # item 1: 150 + 0.3; items 399, 398, ...: 119.7, 119.4, ...; item 0 (100) only after item 334
    ids_ = store.items.item_id
    popular = np.array([ids_[1], ids_[399], ids_[398], ids_[397], ids_[396]])
    assert ids[:2].tolist() == [popular.tolist()] * 2 and np.isnan(scores[:2]).all()
    # a recent action, a context item or a training-window event: the towers, as without the rule
    emb = pq.read_table(os.path.join(out, "item_embeddings.parquet"))
    items = np.stack(emb.column("embedding").to_numpy(zero_copy_only=False))
    rows, _ = exact_top_k(items, r.embed(requests.slice(2)), 5)
    np.testing.assert_array_equal(ids[2:], emb.column("item_id").to_numpy()[rows])
    assert np.isfinite(scores[2:]).all()
    checked = check_requests(requests)
    assert store.new_users(checked, np.array([0, 0, 1, 0, 0], bool)).tolist() == [True, True, False, False, False]


def test_export_holds_everything_and_towers_match_the_model(world):
    model, store, _, _, out = world
    assert sorted(os.listdir(out)) == sorted([
        "checksums.json", "feature_spec.json", "index.json", "item_embeddings.parquet", "item_tower.pt2",
        "items.faiss", "items.parquet", "user_tower.pt2", "users.parquet"])
    user, item, meta = load_towers(out)
    emb = pq.read_table(os.path.join(out, "item_embeddings.parquet"))
    assert emb.column("item_id").to_numpy().tolist() == store.items.item_id.tolist()
    with torch.no_grad():  # parity with the training model via the saved artifacts, raw ids in
        want = model.embed_items({n: torch.from_numpy(v) for n, v in store.items.pack().items()}).numpy()
        got = item(*item_inputs({n: torch.from_numpy(v) for n, v in store.items.pack().items()})).numpy()
    stored = np.stack(emb.column("embedding").to_numpy(zero_copy_only=False))
    assert np.abs(got - want).max() < 1e-5 and np.abs(stored - want).max() < 1e-5
    index = json.loads(open(os.path.join(out, "index.json")).read())
    assert index["kind"] == "flat" and index["exact"] and index["recall"]["value"] == 1.0
    assert index["recall"]["n_queries"] > 100 and meta["history_length"] == L


def test_retrieve_returns_the_evaluation_top_k(world):
    model, store, events, history, out = world
    k = 25
    want, q_eval, items = _evaluation_top_k(model, store, history, events, k)
    r = Retriever(out)
    requests = evaluation_requests(events, history, L, max_queries=10**9)
    assert requests.num_rows == len(want) > 100
    assert np.abs(r.embed(requests) - q_eval).max() < 1e-5  # raw context -> the same user embedding
    got, scores = r.search(requests, k)
    np.testing.assert_array_equal(got, want)
    assert np.allclose(scores[:, 0], (q_eval * items[np.searchsorted(store.items.item_id, want[:, 0])]).sum(1),
                       atol=1e-5)
    # one request as a dict, with its recent actions, is the same as its row
    row = requests.slice(7, 1).to_pylist()[0]
    ids, s = r.retrieve(k=k, **row)
    np.testing.assert_array_equal(ids, want[7])
    assert (np.diff(s) <= 1e-6).all()
    # a Parquet-style batch table: the result columns are appended, other columns pass through
    table = r.retrieve_table(requests.append_column("request_id", pa.array(np.arange(requests.num_rows))), k=5)
    assert table.column("item_ids").to_pylist()[3] == want[3, :5].tolist()
    assert table.column("request_id").to_pylist()[3] == 3


def test_a_request_s_recent_items_score_the_fitted_boost_higher(world, tmp_path):
    model, store, events, history, plain = world
    out, boost, k = str(tmp_path / "export"), 0.4, 25
    export_run(model, dataclasses.replace(store, history=history, history_length=L), out,
               index_cfg(recall_k=20, new_users="model"), use_ray=False, log=lambda *_: None,
               recent_boost=(L, boost, "fitted on the validation window"))
    meta = json.load(open(os.path.join(out, "index.json")))
    assert (meta["recent_items"], meta["recent_boost"], meta["recent_boost_source"]) == (
        L, boost, "fitted on the validation window")
    requests = evaluation_requests(events, history, L, max_queries=10**9)
    got, scores = Retriever(out).search(requests, k)
    # golden: every item's inner product, + boost for the distinct items of the request's actions
    emb = pq.read_table(os.path.join(out, "item_embeddings.parquet"))
    ids, items = emb.column("item_id").to_numpy(), np.stack(emb.column("embedding").to_numpy(zero_copy_only=False))
    full = Retriever(plain).embed(requests) @ items.T
    for row, recent in enumerate(requests.column("recent_item_ids").to_pylist()):
        full[row, np.searchsorted(ids, sorted(set(recent)))] += boost
    want_scores = -np.sort(-full, axis=1)[:, :k]
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    # the same items, up to the order of near-ties (float32 sums in another order: faiss, numpy)
    scores_of_got = np.take_along_axis(full, np.searchsorted(ids, got), axis=1)
    np.testing.assert_allclose(scores_of_got, want_scores, atol=1e-5)
    assert (got == ids[np.argsort(-full, axis=1, kind="stable")[:, :k]]).mean() > 0.999
    unboosted, _ = Retriever(plain).search(requests, k)
    assert (got != unboosted).any(axis=1).mean() > 0.5  # the boost moved most lists


def test_requests_without_optional_columns_and_unknown_users(world):
    *_, out = world
    r = Retriever(out)
    plain = pa.table({"user_id": pa.array([5, 10**12]), "surface": pa.array(["home", "search"])})
    ids, _ = r.search(plain, 10)
    assert ids.shape == (2, 10) and (ids >= 0).all()
    a, _ = r.retrieve(user_id=5, surface="home", k=10)
    np.testing.assert_array_equal(a, ids[0])  # absent context / query / recent actions = none
    assert r.search(plain, 10_000)[0].shape == (2, N_ITEMS)  # k above the corpus: every item once


def test_index_is_exact_below_the_threshold_and_approximate_above():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3000, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    q = rng.normal(size=(200, 16)).astype(np.float32)
    flat, desc = build_index(emb, index_cfg(exact_max_items=3000))
    assert desc["kind"] == "flat" and index_recall(flat, emb, q, 50) == 1.0
    ivf, desc = build_index(emb, index_cfg(exact_max_items=1000, kind="ivf", nlist=32, nprobe=8))
    assert desc["kind"] == "ivf" and desc["nlist"] == 32 and 0.3 < index_recall(ivf, emb, q, 50) < 1.0
    hnsw, desc = build_index(emb, index_cfg(exact_max_items=1000, kind="hnsw", hnsw_m=16, ef_search=64))
    assert desc["kind"] == "hnsw" and 0.5 < index_recall(hnsw, emb, q, 50) <= 1.0
    with pytest.raises(ValueError, match="index.kind='annoy'"):
        build_index(emb, index_cfg(exact_max_items=10, kind="annoy"))
    with pytest.raises(ValueError, match="unknown key"):
        build_index(emb, index_cfg(exact_max_item=10))
    with pytest.raises(ValueError, match="missing key.*nprobe"):
        build_index(emb, {k: v for k, v in index_cfg().items() if k != "nprobe"})


def test_an_approximate_index_and_its_measured_recall_go_to_the_export(world, tmp_path):
    model, store, events, history, out = world
    copy = str(tmp_path / "export")
    shutil.copytree(out, copy)
    layout = json.loads(open(os.path.join(out, "index.json")).read())["tables"]
    requests = evaluation_requests(events, history, L, max_queries=150)
    meta = write_index(copy, store, layout, L, index_cfg(exact_max_items=100, kind="hnsw", recall_k=20),
                       requests, use_ray=False, log=lambda *_: None)
    assert meta["kind"] == "hnsw" and meta["recall"]["n_queries"] == 150 and 0.5 < meta["recall"]["value"] <= 1.0
    on_disk = json.loads(open(os.path.join(copy, "index.json")).read())
    assert on_disk["recall"] == meta["recall"]


def test_an_export_without_faiss_has_embeddings_and_says_how_to_index_them(world, tmp_path, monkeypatch, caplog):
    """A GPU host may lack faiss: the export still writes towers, tables and item embeddings,
    warns how to build the index, and a Retriever on it names the missing file."""
    import logging
    import sys

    model, store, events, history, out = world
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    copy = str(tmp_path / "no_faiss")
    shutil.copytree(out, copy)  # an earlier export's index must not stay behind
    with caplog.at_level(logging.WARNING, logger="raycg"):
        export_run(model, store, copy, index_cfg(recall_k=20), use_ray=False)
    assert "faiss is not installed here" in caplog.text and "python -m raycg.export" in caplog.text
    assert os.path.exists(os.path.join(copy, "item_embeddings.parquet"))
    assert not os.path.exists(os.path.join(copy, "items.faiss")) and not os.path.exists(os.path.join(copy, "index.json"))
    monkeypatch.delitem(sys.modules, "faiss")
    with pytest.raises(ExportError, match="items.faiss: missing"):
        Retriever(copy)


def _broken_copy(out, tmp_path, edit):
    copy = str(tmp_path / "broken")
    shutil.copytree(out, copy)
    edit(copy)
    return copy


def test_broken_exports_are_clear_errors(world, tmp_path):
    *_, out = world
    copy = _broken_copy(out, tmp_path, lambda d: os.remove(os.path.join(d, "items.faiss")))
    with pytest.raises(ExportError, match=r"items\.faiss: missing"):
        Retriever(copy)
    with pytest.raises(ExportError, match="no such export directory"):
        Retriever(str(tmp_path / "nothing"))

    def version(v):
        def edit(d):
            path = os.path.join(d, "feature_spec.json")
            meta = json.load(open(path))
            if v is None:
                del meta["format_version"]
            else:
                meta["format_version"] = v
            json.dump(meta, open(path, "w"))
            write_checksums(d, list(json.load(open(os.path.join(d, "checksums.json")))))
        return edit

    shutil.rmtree(copy)
    copy = _broken_copy(out, tmp_path, version(99))
    with pytest.raises(ExportError, match="format_version 99, this raycg reads format_version 2.*newer"):
        Retriever(copy)
    shutil.rmtree(copy)
    copy = _broken_copy(out, tmp_path, version(None))  # a TorchScript export of older raycg
    with pytest.raises(ExportError, match="format_version 1.*TorchScript.*re-export"):
        Retriever(copy)
    shutil.rmtree(copy)
    copy = _broken_copy(out, tmp_path, lambda d: open(os.path.join(d, "users.parquet"), "ab").write(b"x"))
    with pytest.raises(ExportError, match=r"users\.parquet: damaged"):
        Retriever(copy)


@pytest.mark.parametrize("request_, match", [
    (dict(user_id=1, surface="homepage"), "unknown value, e.g. 'homepage'; allowed: \\['home', 'related', 'search'\\]"),
    (dict(user_id="12", surface="home"), "user_id='12' is not an integer id"),
    (dict(user_id=1.0, surface="home"), "user_id=1.0 is not an integer id"),
    (dict(user_id=True, surface="home"), "user_id=True is not an integer id"),
    (dict(user_id=-3, surface="home"), "'user_id' has 1 of 1 rows below 0"),
    (dict(user_id=1, surface="related", context_item_id=-2), "'context_item_id' has 1 of 1 rows below -1"),
    (dict(user_id=1, surface="home", query_id="q7"), "query_id='q7' is not an integer id"),
    (dict(user_id=1, surface="home", recent_item_ids=[3, 4], recent_event_types=["click"]), "different lengths"),
    (dict(user_id=1, surface="home", recent_item_ids=[3], recent_event_types=["view"]), "unknown event type"),
    (dict(user_id=1, surface="home", recent_item_ids=[-3], recent_event_types=["click"]), "negative item ids"),
    (dict(user_id=1, surface="home", page=2), "unknown field"),
    (dict(surface="home"), "user_id and surface are required"),
])
def test_malformed_requests_are_clear_errors(world, request_, match):
    *_, out = world
    with pytest.raises(RequestError, match=match):
        Retriever(out).retrieve(k=5, **request_)


def test_malformed_batches_are_clear_errors(world):
    *_, out = world
    r = Retriever(out)
    with pytest.raises(RequestError, match="'user_id' has type string, expected integer"):
        r.search(pa.table({"user_id": ["1"], "surface": ["home"]}), 5)
    with pytest.raises(RequestError, match="missing required column 'surface'"):
        r.search(pa.table({"user_id": [1]}), 5)
    with pytest.raises(RequestError, match="'surface' has 1 null"):
        r.search(pa.table({"user_id": pa.array([1, 2]), "surface": pa.array(["home", None])}), 5)
    with pytest.raises(RequestError, match="k=0"):
        r.search(pa.table({"user_id": [1], "surface": ["home"]}), 0)


def test_command_line_one_request(world, capsys):
    from hydra.errors import ConfigCompositionException

    from raycg.config import compose
    from raycg.retrieve.__main__ import main, run

    *_, out = world
    cfg = compose([f"export_dir={out}", "user_id=5", "surface=related", "context_item_id=7", "k=4"], "retrieve")
    got = run(cfg)
    ids, scores = Retriever(out).retrieve(user_id=5, surface="related", context_item_id=7, k=4)
    assert got["item_ids"] == ids.tolist() and json.loads(capsys.readouterr().out)["item_ids"] == ids.tolist()
    with pytest.raises(ConfigCompositionException, match="user_id"):  # typed: not an int, before any work
        compose([f"export_dir={out}", "user_id=abc"], "retrieve")
    assert main([f"export_dir={out}", "user_id=5", "surface=moon"]) == 2  # unknown surface: a clear error
    assert "surface" in capsys.readouterr().err


def test_batch_mode_runs_on_ray_data(world, tmp_path, ray_session):
    from raycg.retrieve import retrieve_parquet

    model, store, events, history, out = world
    requests = evaluation_requests(events, history, L, max_queries=300)
    pq.write_table(requests.append_column("request_id", pa.array(np.arange(300))), str(tmp_path / "req.parquet"))
    n = retrieve_parquet(out, str(tmp_path / "req.parquet"), str(tmp_path / "top.parquet"), k=10, batch_size=64)
    got = pq.read_table(str(tmp_path / "top.parquet"))
    assert n == got.num_rows == 300 and got.column("request_id").to_pylist() == list(range(300))
    want, _ = Retriever(out).search(requests, 10)
    assert got.column("item_ids").to_pylist() == want.tolist()
    # the corpus embedded by Ray Data batch inference, as the driver does it
    layout = json.loads(open(os.path.join(out, "index.json")).read())["tables"]
    ids, emb = embed_items(out, layout, batch_size=128, use_ray=True)
    stored = pq.read_table(os.path.join(out, "item_embeddings.parquet"))
    assert ids.tolist() == stored.column("item_id").to_pylist()
    assert np.abs(emb - np.stack(stored.column("embedding").to_numpy(zero_copy_only=False))).max() < 1e-6
