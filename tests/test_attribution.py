"""Conversions belong to their request: the attribution column, query times, repeat vs novel
positives and the recent_engaged baseline (golden values by hand)."""
import numpy as np
import pyarrow as pa
import pytest

from raycg.data.batches import query_time
from raycg.data.history import HistoryIndex
from raycg.data.schema import EventSchemaError, check_values, event_columns
from raycg.eval.queries import build_queries
from raycg.eval.reengagement import NEVER, EngagementTimeline

T0 = 1_767_225_600


def events(rows):
    """rows: (user, item, event_type, timestamp, request_ts)."""
    u, i, e, t, r = zip(*rows)
    n = len(rows)
    return pa.table({
        "user_id": pa.array(u, pa.int64()), "item_id": pa.array(i, pa.int64()),
        "advertiser_id": pa.array([0] * n, pa.int64()), "surface": ["home"] * n, "event_type": list(e),
        "click_duration": pa.array([5.0] * n, pa.float32()), "timestamp": pa.array([T0 + x for x in t], pa.int64()),
        "context_item_id": pa.array([-1] * n, pa.int64()), "query_id": pa.array([-1] * n, pa.int64()),
        "request_ts": pa.array([T0 + x if x >= 0 else -1 for x in r], pa.int64()),
    })


def test_a_conversion_is_queried_at_its_click_and_never_sees_it():
    # user 1 clicks item 7 at t=100 and converts on it at t=5000 (attributed to the click)
    ev = events([(1, 3, "click", 50, -1), (1, 7, "click", 100, -1), (1, 7, "checkout", 5000, 100)])
    assert query_time(ev).tolist() == [T0 + 50, T0 + 100, T0 + 100]
    queries, positives = build_queries(ev, "conversion")
    assert queries.column("timestamp").to_pylist() == [T0 + 100] and [p.tolist() for p in positives] == [[7]]
    history = HistoryIndex.from_events(ev)
    items, _ = history.lookup(np.array([1]), np.array([T0 + 100]), 3)
    assert items.tolist() == [[-1, -1, 3]]  # strictly before the click: item 7 is not in the history
    items, _ = history.lookup(np.array([1]), np.array([T0 + 5000]), 3)
    assert items.tolist() == [[-1, 3, 7]]  # what the unattributed protocol saw: the click itself
    # without the column the conversion is its own request
    assert query_time(ev.drop_columns(["request_ts"])).tolist() == [T0 + 50, T0 + 100, T0 + 5000]


def test_request_ts_after_the_event_is_a_data_error():
    ev = events([(1, 7, "checkout", 100, 200)])
    assert [c.name for c in event_columns(ev.column_names)][-1] == "request_ts"
    with pytest.raises(EventSchemaError, match="'request_ts' has 1 of 1 rows after the event's own timestamp"):
        check_values(ev, "f.parquet", event_columns(ev.column_names))


def test_repeat_and_novel_positives_and_recent_engaged_golden():
    # the module docstring's example: u=1 clicked 7 at t=10 and 9 at t=20
    tl = EngagementTimeline(HistoryIndex.from_events(events([(1, 7, "click", 10, -1), (1, 9, "click", 20, -1),
                                                             (2, 7, "save", 30, -1)])))
    assert tl.first_time(np.array([1, 1, 2, 3]), np.array([7, 9, 7, 7])).tolist() == [T0 + 10, T0 + 20, T0 + 30, NEVER]
    masks = tl.repeat_masks(np.array([1, 2]), np.array([T0 + 15, T0 + 30]), [np.array([7, 9]), np.array([7])])
    assert [m.tolist() for m in masks] == [[True, False], [False]]  # strictly before: 2's save at 30 is not
    pop = np.array([5, 9, 6, 7, 8])
    top = tl.recent_engaged(np.array([1, 1, 4]), np.array([T0 + 25, T0 + 15, T0 + 25]), 4, pop)
    assert top.tolist() == [[9, 7, 5, 6], [7, 5, 9, 6], [5, 9, 6, 7]]


def test_queries_come_in_one_order_whatever_the_order_of_the_events():
    # pyarrow's threaded group_by returns groups in a varying order; the order moved the mean
    # recall's last bit between two deterministic runs (and the bootstrap intervals): keys sorted
    rng = np.random.default_rng(0)
    rows = [(int(u), int(i), str(e), int(t), -1) for u, i, e, t in zip(
        rng.integers(0, 300, 3000), rng.integers(0, 50, 3000), rng.choice(["click", "save", "checkout"], 3000),
        rng.integers(0, 10_000, 3000))]
    for task in ("engagement", "conversion"):
        want, want_pos = build_queries(events(rows), task)
        keys = ["user_id", "surface", "context_item_id", "query_id", "timestamp"]
        assert want.sort_by([(k, "ascending") for k in keys]).equals(want)
        for seed in range(3):
            got, got_pos = build_queries(events([rows[j] for j in np.random.default_rng(seed).permutation(3000)]), task)
            assert got.equals(want)
            assert [sorted(p.tolist()) for p in got_pos] == [sorted(p.tolist()) for p in want_pos]
