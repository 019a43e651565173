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
