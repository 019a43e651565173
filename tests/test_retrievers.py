"""One retriever interface for evaluation (raycg.eval.retrievers): a baseline registered by
name is built and scored next to the others by the same code; golden values by hand."""
import numpy as np
import pyarrow as pa
import pytest

from raycg.data.history import HistoryIndex
from raycg.eval.evaluate import format_table, score_retrievers
from raycg.eval.reengagement import EngagementTimeline
from raycg.eval.retrievers import BASELINES, ModelRetriever, Queries, TrainingWindow, build_baselines

T0 = 1_767_225_600
CORPUS = np.array([1, 2, 3, 4, 5, 6])
ADVERTISER = np.array([10, 10, 20, 20, 30, 30])  # of each corpus row


def events(rows):
    """rows: (user, item, event_type, seconds after T0)."""
    u, i, e, t = zip(*rows)
    n = len(rows)
    return pa.table({
        "user_id": pa.array(u, pa.int64()), "item_id": pa.array(i, pa.int64()), "surface": ["home"] * n,
        "event_type": list(e), "timestamp": pa.array([T0 + x for x in t], pa.int64()),
        "context_item_id": pa.array([-1] * n, pa.int64()), "query_id": pa.array([-1] * n, pa.int64()),
    })


class Fixed:
    """The same ranking for every query; answers half of them itself (say)."""

    name = "fixed"

    def __init__(self, ranking):
        self.ranking = np.asarray(ranking)

    def retrieve(self, queries: Queries, k: int) -> np.ndarray:
        return np.broadcast_to(self.ranking[:k], (len(queries), min(k, len(self.ranking))))

    def coverage(self, queries: Queries) -> float:
        return 0.5


def test_a_registered_baseline_is_built_and_scored_like_the_others(monkeypatch):
    # training: item 2 clicked twice, item 4 bought once; held out: user 1 clicks 3, user 2 buys 5
    train = events([(1, 2, "click", 10), (2, 2, "click", 11), (2, 4, "checkout", 12)])
    held_out = events([(1, 3, "click", 100), (2, 5, "checkout", 200)])
    timeline = EngagementTimeline(HistoryIndex.from_events(pa.concat_tables([train, held_out])))
    window = TrainingWindow(train.select(["user_id", "item_id", "event_type", "surface"]), CORPUS, timeline, {})
    monkeypatch.setitem(BASELINES, "fixed", lambda w: Fixed([5, 3, 1, 2, 4, 6]))

    retrievers = build_baselines(["fixed", "popularity"], window)
    assert [r.name for r in retrievers] == ["fixed", "popularity"]
    results, seconds = score_retrievers(retrievers, held_out, [1, 2], CORPUS, ADVERTISER, timeline,
                                        log=lambda msg: None)

    assert results["methods"] == ["fixed", "popularity"] and set(seconds["retrieve"]) == {"fixed", "popularity"}
    assert results["n_queries"] == {"conversion": 1, "conversion_repeat": 0, "conversion_novel": 1,
                                    "conversion_advertiser": 1, "engagement": 1, "engagement_repeat": 0,
                                    "engagement_novel": 1}
    # fixed: 5 (the purchase) first, 3 (the click) second
    assert results["fixed"]["conversion"] == results["fixed"]["conversion_novel"] == {1: 1.0, 2: 1.0}
    assert results["fixed"]["engagement"] == {1: 0.0, 2: 1.0}
    assert results["fixed"]["conversion_advertiser"] == {1: 1.0, 2: 1.0}  # advertiser 30 = item 5's
    # popularity: conversions [4, 2, ...], engagement [2, 4, ...]: neither finds 5 or 3 in the top 2
    assert results["popularity"]["conversion"] == results["popularity"]["engagement"] == {1: 0.0, 2: 0.0}
    assert results["popularity"]["conversion_advertiser"] == {1: 0.0, 2: 0.0}  # advertisers 20, 10
    assert results["als_coverage"] == {"fixed": {"conversion": 0.5, "engagement": 0.5}}  # only who reports it

    with pytest.raises(ValueError, match=r"eval.baselines: unknown \['nope'\]; choose from \['popularity', "):
        build_baselines(["popularity", "nope"], window)


def test_the_model_retriever_ranks_by_inner_product():
    item_emb = np.eye(3, dtype=np.float32)  # corpus ids 7, 8, 9 point along the axes
    queries = Queries.of("engagement", events([(1, 3, "click", 0), (2, 3, "click", 0)]))
    query_emb = np.array([[0, 0.1, 1], [1, 0.5, 0]], np.float32)
    model = ModelRetriever(np.array([7, 8, 9]), item_emb, lambda table: query_emb, batch_size=8)
    assert model.retrieve(queries, 2).tolist() == [[9, 8], [7, 8]]
    assert model.search_s >= 0.0


def test_queries_split_into_users_with_a_training_event_and_new_users():
    # user 1 clicked in training, user 3 never did: two engagement queries, one per part
    held_out = events([(1, 3, "click", 100), (3, 5, "click", 150), (3, 1, "checkout", 200)])
    timeline = EngagementTimeline(HistoryIndex.from_events(held_out))
    results, _ = score_retrievers([Fixed([5, 3, 1, 2, 4, 6])], held_out, [1, 2], CORPUS, ADVERTISER, timeline,
                                  log=lambda msg: None, known_users=np.array([1, 2]))

    assert results["new_user_share"] == {"conversion": 1.0, "engagement": 0.5}
    assert results["n_queries"]["engagement_known_user"] == results["n_queries"]["engagement_new_user"] == 1
    assert results["n_queries"]["conversion_known_user"] == 0
    # fixed ranks 5 first, 3 second: user 3's click on 5 at @1, user 1's click on 3 only at @2
    assert results["fixed"]["engagement_new_user"] == {1: 1.0, 2: 1.0}
    assert results["fixed"]["engagement_known_user"] == {1: 0.0, 2: 1.0}
    assert results["fixed"]["conversion_new_user"] == {1: 0.0, 2: 0.0}  # item 1 is third
    assert "conversion_known_user" not in results["fixed"]
    table = format_table(dict(results, model=results["fixed"], methods=["fixed"]))
    assert "conversion 100% new, engagement 50% new" in table and "enga-new R@1" in table


def test_the_model_retriever_answers_requests_with_nothing_to_go_on_by_the_given_ranking():
    item_emb = np.eye(3, dtype=np.float32)
    queries = Queries.of("engagement", events([(1, 3, "click", 0), (2, 3, "click", 0)]))
    query_emb = np.array([[0, 0.1, 1], [1, 0.5, 0]], np.float32)
    is_new = lambda q: q.users == 2  # noqa: E731
    model = ModelRetriever(np.array([7, 8, 9]), item_emb, lambda table: query_emb, batch_size=8,
                           new_users=(is_new, np.array([8, 7, 9])))
    assert model.retrieve(queries, 2).tolist() == [[9, 8], [8, 7]]
    assert model.served_popularity == {"engagement": 1}


def test_the_model_retriever_serves_the_recent_item_boost():
    # score = <q, v> + b [item among the query's recent items]: query 0 at [0.1, 0.5, 1] ranks
    # 9, 8, 7; with item 7 recent and b = 0.95 it scores 1.05 and comes first
    item_emb = np.eye(3, dtype=np.float32)
    queries = Queries.of("engagement", events([(1, 3, "click", 0), (2, 3, "click", 0)]))
    query_emb = np.array([[0.1, 0.5, 1], [1, 0.5, 0]], np.float32)
    recent = lambda q: np.array([[0, -1], [-1, -1]])  # noqa: E731  corpus rows: item 7 for query 0
    for boost, want in ((0.95, [[7, 9], [7, 8]]), (0.85, [[9, 7], [7, 8]]), (0.0, [[9, 8], [7, 8]])):
        model = ModelRetriever(np.array([7, 8, 9]), item_emb, lambda table: query_emb, batch_size=8,
                               recent=(recent, boost))
        assert model.retrieve(queries, 2).tolist() == want, boost
        assert (model.boost_s > 0) == (boost > 0)  # b = 0: the towers alone, nothing merged


class PerUser:
    """A random ranking per query, fixed by the query's user (so the test can recompute it)."""

    name = "per_user"

    def retrieve(self, queries: Queries, k: int) -> np.ndarray:
        return np.stack([np.random.default_rng(int(u)).permutation(CORPUS_BIG)[:k] for u in queries.users])


CORPUS_BIG = np.arange(1, 41)


def test_every_part_scores_as_if_its_queries_and_positives_were_scored_alone():
    """Repeat / novel positives and known / new users are read off one ranking pass; each must
    equal recall@K computed by its definition on that part's queries and positives alone."""
    rng = np.random.default_rng(3)
    train = events([(int(u), int(i), "click", int(t)) for u, i, t in
                    zip(rng.integers(0, 60, 400), rng.integers(1, 41, 400), rng.integers(0, 1000, 400))])
    held = events([(int(u), int(i), str(e), int(t)) for u, i, e, t in
                   zip(rng.integers(0, 80, 600), rng.integers(1, 41, 600),
                       rng.choice(["click", "save"], 600), rng.integers(1000, 2000, 600))])
    timeline = EngagementTimeline(HistoryIndex.from_events(pa.concat_tables([train, held])))
    known_users = np.unique(train.column("user_id").to_numpy())
    results, _ = score_retrievers([PerUser()], held, [3, 10], CORPUS_BIG, CORPUS_BIG % 7, timeline,
                                  log=lambda msg: None, known_users=known_users)

    from raycg.eval.queries import build_queries

    queries, positives = build_queries(held, "engagement")
    users, times = queries.column("user_id").to_numpy(), queries.column("timestamp").to_numpy()
    tops = PerUser().retrieve(Queries.of("engagement", queries), 10)
    want = {"repeat": [], "novel": [], "known_user": [], "new_user": []}
    for u, t, pos, top in zip(users, times, positives, tops):
        first = timeline.first_time(np.full(len(pos), u), pos)
        for part, keep in (("repeat", first < t), ("novel", first >= t),
                           ("known_user", np.full(len(pos), u in known_users)),
                           ("new_user", np.full(len(pos), u not in known_users))):
            if keep.any():
                want[part].append([np.isin(pos[keep], top[:k]).mean() for k in (3, 10)])
    for part, rows in want.items():
        assert len(rows) >= 10, part  # every part is populated, so the comparison means something
        assert results["n_queries"][f"engagement_{part}"] == len(rows)
        got = results["per_user"][f"engagement_{part}"]
        assert [got[3], got[10]] == pytest.approx(np.mean(rows, axis=0).tolist())


def test_max_queries_scores_a_seeded_sample_and_says_so():
    held = events([(u, 1 + u % 6, "click", 100 + u) for u in range(50)])
    timeline = EngagementTimeline(HistoryIndex.from_events(held))
    runs = [score_retrievers([Fixed([5, 3, 1, 2, 4, 6])], held, [1, 2], CORPUS, ADVERTISER, timeline,
                             log=lambda msg: None, max_queries=20, seed=s)[0] for s in (0, 0, 1)]
    assert runs[0]["n_queries"]["engagement"] == 20
    assert runs[0]["sampled_queries"] == {"engagement": {"used": 20, "of": 50}}
    assert runs[0]["fixed"] == runs[1]["fixed"]  # the same seed, the same sample
    assert runs[0]["detail"]["fixed"]["engagement"] != runs[2]["detail"]["fixed"]["engagement"]
    assert "scored on a uniform sample (eval.max_queries): engagement 20 of 50 queries" in format_table(
        dict(runs[0], model=runs[0]["fixed"], methods=["fixed"]))
    full = score_retrievers([Fixed([5, 3, 1, 2, 4, 6])], held, [1, 2], CORPUS, ADVERTISER, timeline,
                            log=lambda msg: None, max_queries=50)[0]
    assert full["sampled_queries"] == {} and full["n_queries"]["engagement"] == 50


def test_where_evaluation_embeds(ray_session):
    """eval.device: auto on a one-node cluster whose driver has a GPU embeds in the driver; on a
    CPU, or with an explicit device, the Ray Data actors (above eval.ray_inference_min_rows)."""
    from raycg.eval.evaluate import embed_in_driver, eval_devices

    assert eval_devices("cpu") == (False, "cpu")
    assert eval_devices("auto")[0] is False  # this test cluster has no GPU
    assert embed_in_driver("auto", "cuda") is True  # one node: nothing to distribute
    assert embed_in_driver("auto", "cpu") is False and embed_in_driver("cuda", "cuda") is False
    with pytest.raises(ValueError, match=r"eval.device='tpu': expected one of \['auto', 'cpu', 'cuda'\]"):
        eval_devices("tpu")


class IdsOf:
    """Another retriever's `retrieve` (ids) alone: scoring then takes the id path."""

    def __init__(self, retriever):
        self.inner, self.name = retriever, "ids"

    def retrieve(self, queries: Queries, k: int) -> np.ndarray:
        return self.inner.retrieve(queries, k)


def test_the_model_scores_the_same_through_corpus_rows_as_through_ids():
    """ModelRetriever.retrieve_rows skips the [Q, K] id gather; every number in the results,
    new-user rows (a ranking with an item outside the corpus, id 0) and advertisers included, must
    equal scoring its ids."""
    rng = np.random.default_rng(5)
    held = events([(int(u), int(i), str(e), int(t)) for u, i, e, t in
                   zip(rng.integers(0, 50, 500), rng.integers(1, 41, 500),
                       rng.choice(["click", "save", "checkout"], 500), rng.integers(0, 1000, 500))])
    timeline = EngagementTimeline(HistoryIndex.from_events(held))
    item_emb = rng.normal(size=(len(CORPUS_BIG), 4)).astype(np.float32)

    def model():  # one per path, each with the same query embeddings
        queries_rng = np.random.default_rng(7)
        return ModelRetriever(CORPUS_BIG, item_emb,
                              lambda table: queries_rng.normal(size=(table.num_rows, 4)).astype(np.float32),
                              batch_size=16, new_users=(lambda q: q.users % 3 == 0, np.r_[40, 0, 1:19]))

    scored = {}
    for name, retriever in (("rows", model()), ("ids", IdsOf(model()))):
        results, _ = score_retrievers([retriever], held, [1, 2, 20], CORPUS_BIG, CORPUS_BIG % 2, timeline,
                                      log=lambda msg: None, known_users=np.arange(0, 50, 2))
        scored[name] = results["detail"]["model" if name == "rows" else "ids"]
    assert scored["rows"] == scored["ids"]
    assert scored["rows"]["conversion"][20]["mean"] > 0 and scored["rows"]["conversion_advertiser"][2]["mean"] > 0
