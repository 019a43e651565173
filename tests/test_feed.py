"""Feeding a worker: device batches from Ray transfers, in-process (thread) and from an ingest
actor (process) through shared memory: same rows, same order, full batches only."""
import os

import numpy as np
import pytest
import torch

from raycg.train.feed import ThreadFeed, device_batches
from raycg.train.ingest import ProcessFeed, slot_layout

N, B = 10_240, 256  # 40 batches; 10 transfers of 4 batches: every row is trained
# Ray Data may hand blocks over in any order (DataContext.execution_options.preserve_order is
# off), so rows are compared as sets, with every row's columns checked to stay together.


@pytest.fixture(scope="module")
def dataset(ray_session):
    rows = [{"ids": np.array([i, -i, 7], dtype=np.int64), "x": np.array([i / 2, 1.5], dtype=np.float32),
             "w": np.float32(i)} for i in range(N)]
    return ray_session.data.from_items(rows).repartition(7).materialize()


def rows_of(batches) -> dict[str, np.ndarray]:
    """Rows of all batches, sorted by id, after checking each row's columns belong together."""
    cat = {k: torch.cat([b[k] for b in batches]).cpu().numpy() for k in ("ids", "x", "w")}
    np.testing.assert_array_equal(cat["x"][:, 0], cat["ids"][:, 0] / 2)
    np.testing.assert_array_equal(cat["w"], cat["ids"][:, 0])
    order = np.argsort(cat["ids"][:, 0])
    return {k: v[order] for k, v in cat.items()}


def test_device_batches_are_full_slices_of_every_row(dataset):
    batches = list(device_batches(dataset, B, "cpu", transfer_batches=4, prefetch_transfers=1))
    assert len(batches) == N // B and all(len(b["w"]) == B for b in batches)
    np.testing.assert_array_equal(rows_of(batches)["ids"][:, 0], np.arange(N))
    # a remainder smaller than a batch is dropped (drop_last): 10,240 rows -> 13 batches of 768
    assert sum(len(b["w"]) for b in device_batches(dataset, 768, "cpu", transfer_batches=3)) == 13 * 768
    with pytest.raises(ValueError, match="must be > 0"):
        next(device_batches(dataset, 0, "cpu"))


def test_slot_layout_is_aligned_and_disjoint():
    layout, nbytes = slot_layout({"a": ("<i8", (3,)), "b": ("<f4", ()), "c": ("<f4", (2,))}, rows=5)
    spans = sorted((off, off + int(np.prod(shape)) * np.dtype(dt).itemsize) for off, dt, shape in layout.values())
    assert all(off % 64 == 0 for off, _ in spans)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])) and spans[-1][1] <= nbytes


def process_rows(dataset, device: str, epochs: int = 3) -> list[dict]:
    feed = ProcessFeed(dataset, B, device, transfer_batches=4, prefetch_transfers=2)
    try:
        out = []
        for epoch in range(epochs):
            batches = list(feed.epoch())
            assert len(batches) == N // B
            assert all(b["ids"].device.type == torch.device(device).type for b in batches)
            out.append(rows_of(batches))
            # the next pass started early (as the training loop does), or not; the last one is
            # started and never read, as when early stopping ends a run
            if epoch != 1:
                feed.prefetch_epoch()
        path = feed.path
        assert os.path.exists(path)
    finally:
        feed.close()
    assert not os.path.exists(path)  # the shared-memory ring is removed
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_process_ingest_gives_the_thread_path_rows(dataset, device):
    want = rows_of(list(ThreadFeed(dataset, B, "cpu", 4, 2).epoch()))
    for epoch in process_rows(dataset, device):  # every epoch is a full new pass
        for k in want:
            np.testing.assert_array_equal(epoch[k], want[k])
