"""Validation-driven training: the validation window, the validation recall and early stopping."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycg.data.pipeline import validation_cutoff
from raycg.train.validation import EarlyStopping


def test_validation_cutoff_is_a_quantile_of_event_times(tmp_path):
    from raycg.data.schema import EVENT_SCHEMA

    row = {"user_id": 1, "item_id": 2, "advertiser_id": 0, "surface": "home", "event_type": "click",
           "click_duration": 1.0, "context_item_id": -1, "query_id": -1}
    t0 = 1_500_000_000
    # 100 events one minute apart in two files, plus one stray timestamp a year earlier: the
    # last 10% of the events start at the 91st minute (a time-span rule would put almost
    # every event in the window)
    times = [[t0 - 365 * 86400] + [t0 + 60 * k for k in range(50)], [t0 + 60 * k for k in range(50, 100)]]
    for i, ts in enumerate(times):
        pq.write_table(pa.Table.from_pylist([{**row, "timestamp": t} for t in ts], schema=EVENT_SCHEMA),
                       tmp_path / f"part-{i}.parquet")
    cutoff = validation_cutoff(str(tmp_path), 0.1)
    assert cutoff == t0 + 60 * 90  # 10 of 101 events at/after it
    # files larger than the sample: evenly spaced order statistics, weighted, land close by
    assert abs(validation_cutoff(str(tmp_path), 0.1, sample_per_file=10) - cutoff) <= 5 * 60
    assert validation_cutoff(str(tmp_path), 0) is None
    with pytest.raises(ValueError, match="validation_fraction"):
        validation_cutoff(str(tmp_path), 1.0)


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience():
    es = EarlyStopping("val_conversion_recall@100", patience=2, min_delta=0.01)
    history = [0.30, 0.35, 0.355, 0.34, 0.37]  # improves at 0, 1; 2 (+0.005) is within min_delta
    improved, stops = [], []
    for epoch, value in enumerate(history):
        improved.append(es.update(epoch, {"val_conversion_recall@100": value}))
        stops.append(es.stop)
    assert improved == [True, True, False, False, True] and stops == [False, False, False, True, False]
    assert (es.best, es.best_epoch) == (0.37, 4)
    again = EarlyStopping("val_conversion_recall@100", patience=2)
    again.load_state_dict(es.state_dict())  # resumed runs keep counting
    assert again.state_dict() == es.state_dict()
    with pytest.raises(KeyError, match="is not measured"):
        es.update(5, {"val_engagement_recall@100": 0.5})
    assert not EarlyStopping("m", patience=0, bad_epochs=9).stop  # patience 0: never stop early


def test_validation_queries_are_a_fixed_sample_of_at_most_max_queries(ray_session, tiny_data_dir):
    """trainer.early_stopping.max_queries: each task keeps at most that many of the window's
    queries, the same ones for the same seed (every epoch is scored on one set)."""
    from collections import Counter

    from omegaconf import OmegaConf

    from conftest import compose, tiny_overrides
    from raycg.data.pipeline import feature_store_from_config, nonempty_event_files
    from raycg.train.validation import ValidationSet

    data = OmegaConf.to_container(compose(tiny_overrides(tiny_data_dir)).data, resolve=True)
    before = validation_cutoff(data["train_path"], 0.1)
    store = feature_store_from_config(data, before_ts=before)
    files = nonempty_event_files(data["train_path"])[0]
    full = ValidationSet.build(files, store, before)
    sizes = {task: len(p) for task, (_, p) in full.queries.items()}
    assert set(sizes) == {"conversion", "engagement"} and sizes["engagement"] > 20, sizes

    def sample(seed):
        return ValidationSet.build(files, store, before, max_queries=20, seed=seed)

    a, b, other = sample(1), sample(1), sample(2)
    assert f"engagement 20 queries (a sample of {sizes['engagement']:,}" in a.describe()
    for task, (packed, positives) in a.queries.items():
        assert len(positives) == min(20, sizes[task])
        assert all(len(v) == len(positives) for v in packed.values())  # features and positives stay paired
        # the sampled queries are queries of the window (with their own positives)
        whole = Counter(tuple(p) for p in full.queries[task][1])
        assert not Counter(tuple(p) for p in positives) - whole
        assert [list(p) for p in positives] == [list(p) for p in b.queries[task][1]]  # the same seed: the same set
    assert [list(p) for p in a.queries["engagement"][1]] != [list(p) for p in other.queries["engagement"][1]]
