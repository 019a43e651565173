"""Losses against values computed by hand / numpy (not by the code under test)."""
import math

import numpy as np
import pytest
import torch

from raycg.losses.softmax import duration_weight, example_weights, in_batch_softmax_loss


def test_docstring_example_value():
    u = v = torch.eye(2)
    loss = in_batch_softmax_loss(u, v, torch.tensor([0, 1]), torch.ones(2), 1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


def np_loss(u, v, ids, w, T, mask=True):
    logits = u @ v.T / T
    B = len(u)
    total = 0.0
    for i in range(B):
        row = logits[i].copy()
        if mask:
            for j in range(B):
                if j != i and ids[j] == ids[i]:
                    row[j] = -np.inf
        m = row.max()
        lse = m + np.log(np.exp(row - m).sum())
        total += w[i] * (lse - row[i])
    return total / B


@pytest.mark.parametrize("mask", [True, False])
def test_weighted_in_batch_softmax_matches_numpy(mask):
    rng = np.random.default_rng(1)
    u = rng.normal(size=(5, 3)); u /= np.linalg.norm(u, axis=1, keepdims=True)
    v = rng.normal(size=(5, 3)); v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = np.array([7, 8, 7, 9, 10])  # rows 0 and 2 share an item: an accidental hit
    w = np.array([1.0, 0.5, 2.0, 0.0, 1.0])
    got = in_batch_softmax_loss(torch.tensor(u), torch.tensor(v), torch.tensor(ids), torch.tensor(w), 0.2,
                                mask_accidental_hits=mask)
    assert got.item() == pytest.approx(np_loss(u, v, ids, w, 0.2, mask), rel=1e-9)


def test_accidental_hit_is_not_a_negative():
    # two rows with the same positive item and identical embeddings: unmasked each row's
    # softmax splits between two equal logits (loss log 2); masked it is 0.
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    ids = torch.tensor([5, 5])
    masked = in_batch_softmax_loss(u, u, ids, torch.ones(2), 1.0, mask_accidental_hits=True)
    unmasked = in_batch_softmax_loss(u, u, ids, torch.ones(2), 1.0, mask_accidental_hits=False)
    assert masked.item() == pytest.approx(0.0, abs=1e-7)
    assert unmasked.item() == pytest.approx(math.log(2), rel=1e-6)


def test_duration_weight_shape():
    t = torch.tensor([0.0, 1.0, 60.0, 600.0])
    w = duration_weight(t, 60.0)
    expected = [0.0, math.log(2) / math.log(61), 1.0, 1.0]
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_duration_weight_rejects_bad_durations(bad):
    with pytest.raises(ValueError, match="click_duration"):
        duration_weight(torch.tensor([1.0, bad]), 60.0)


def test_example_weights_per_event_kind():
    # signals: is_conversion, is_click, is_save, duration
    s = torch.tensor([[1, 0, 0, 0.0], [0, 1, 0, 9.0], [0, 0, 1, 0.0], [0, 1, 0, 0.0]])
    cfg = {"conversion_weight": 2.0, "engagement_weight": 0.5, "t_max": 9.0, "duration_weighting": True}
    np.testing.assert_allclose(example_weights(s, cfg).numpy(), [2.0, 0.5, 0.5, 0.0], atol=1e-7)
    cfg["duration_weighting"] = False
    np.testing.assert_allclose(example_weights(s, cfg).numpy(), [2.0, 0.5, 0.5, 0.5], atol=1e-7)
