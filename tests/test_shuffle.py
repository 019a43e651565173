"""data.shuffle: training rows mixed across files (raycg/data/pipeline.py), on a real Ray Data.

The event files here hold one block of users each, as the scale-out simulator writes them: read
in order, a batch is one block's users and carries their other positives as in-batch negatives.
"""
import os

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from raycg.data.pipeline import build_feature_store, packed_training_dataset

FILES, BATCH = 4, 128


@pytest.fixture(scope="module")
def user_blocks(tiny_data_dir, tmp_path_factory):
    """The tiny dataset's training events rewritten as FILES files of contiguous user ids."""
    out = tmp_path_factory.mktemp("user_blocks")
    events = pq.read_table(os.path.join(tiny_data_dir, "events", "train"))
    events = events.take(pc.sort_indices(events, [("user_id", "ascending"), ("timestamp", "ascending")]))
    users = events.column("user_id").to_numpy()
    bounds = np.quantile(np.unique(users), np.linspace(0, 1, FILES + 1)[1:-1])
    file_of = np.searchsorted(bounds, users, side="right")
    for f in range(FILES):
        pq.write_table(events.filter(file_of == f), str(out / f"part-{f:05d}.parquet"))
    store = build_feature_store(str(out), os.path.join(tiny_data_dir, "items.parquet"), history_length=0)
    return str(out), store, bounds


def batches(ds, n: int | None = None, drop_last: bool = True) -> list[np.ndarray]:
    """[user_id, item_id] of the first `n` batches of BATCH rows, in the order training reads them."""
    out = []
    for b in ds.iter_batches(batch_size=BATCH, batch_format="numpy", drop_last=drop_last):
        out.append(np.stack([b["user_cat"][:, 0], b["item_cat"][:, 0]], axis=1))
        if n is not None and len(out) == n:
            break
    return out


def packed(user_blocks, shuffle: str, seed: int = 0):
    path, store, _ = user_blocks
    return packed_training_dataset(path, store, batch_size=512, shuffle=shuffle, seed=seed, preserve_order=True)


def rows(ds) -> np.ndarray:
    """Every row's [user_id, item_id], sorted: the multiset, whatever the order."""
    allrows = np.concatenate(batches(ds, drop_last=False))
    return allrows[np.lexsort(allrows.T[::-1])]


def test_file_order_puts_one_block_of_users_in_a_batch_and_a_shuffle_mixes_them(ray_session, user_blocks):
    _, _, bounds = user_blocks
    (ds_none, stats_none), (ds_once, stats_once) = packed(user_blocks, "none"), packed(user_blocks, "once")
    none, once = batches(ds_none), batches(ds_once)
    assert stats_once["rows_used"] == stats_none["rows_used"] > 20 * BATCH
    assert (stats_none["shuffle"], stats_once["shuffle"]) == ("none", "once")  # in the run's data line
    assert np.array_equal(rows(ds_none), rows(ds_once))  # the same rows: none lost, none repeated
    assert len(rows(ds_none)) == stats_none["rows_used"]
    assert not np.array_equal(np.concatenate(none), np.concatenate(once))  # in another order
    files_per_batch = {name: [len(np.unique(np.searchsorted(bounds, b[:, 0], side="right"))) for b in bs]
                       for name, bs in (("none", none), ("once", once))}
    assert max(files_per_batch["none"]) <= 2      # file order: one block of users, two at a boundary
    assert min(files_per_batch["once"]) == FILES  # shuffled: every batch draws on every block


def test_once_is_seeded_and_the_same_every_epoch(ray_session, user_blocks):
    # (the same seed, the same run: test_reliability's bit-identical pair trains with data.shuffle=once)
    a, _ = packed(user_blocks, "once", seed=3)
    c, _ = packed(user_blocks, "once", seed=4)
    first = np.concatenate(batches(a))
    assert np.array_equal(first, np.concatenate(batches(a)))  # a second epoch: the same order
    assert not np.array_equal(first, np.concatenate(batches(c)))  # another seed: another order


def test_epoch_reshuffles_every_pass_reproducibly(ray_session, user_blocks):
    a, stats = packed(user_blocks, "epoch", seed=3)
    b, _ = packed(user_blocks, "epoch", seed=3)
    a1, a2 = np.concatenate(batches(a)), np.concatenate(batches(a))
    b1, b2 = np.concatenate(batches(b)), np.concatenate(batches(b))
    assert not np.array_equal(a1, a2)  # a new order each pass
    assert np.array_equal(a1, b1) and np.array_equal(a2, b2)  # pass by pass, the same seed repeats it
    assert len(rows(a)) == stats["rows_used"]


def test_unknown_shuffle_names_the_setting(ray_session, user_blocks):
    with pytest.raises(ValueError, match=r"data.shuffle='global': expected one of none, once, epoch"):
        packed(user_blocks, "global")
