"""Streaming frequency estimation against hand-computed values and a known sampling distribution."""
import math

import numpy as np
import pytest
import torch

from raycg.losses.frequency import StreamingFrequencyEstimator


def test_hand_computed_updates():
    est = StreamingFrequencyEstimator(num_buckets=16, alpha=0.5)
    est.update(torch.tensor([3]), 1)          # first sighting: no gap yet
    assert est.log_q(torch.tensor([3])).item() == pytest.approx(-math.log(16))   # default_gap = num_buckets
    est.update(torch.tensor([3]), 3)          # gap 2 -> B = 2 (first gap taken as is)
    assert est.log_q(torch.tensor([3])).item() == pytest.approx(-math.log(2.0))
    est.update(torch.tensor([3]), 4)          # gap 1 -> B = 0.5 * 2 + 0.5 * 1 = 1.5
    assert est.log_q(torch.tensor([3])).item() == pytest.approx(-math.log(1.5))
    assert est.A[3].item() == 4
    # never-seen item, and a hash collision (19 = 3 mod 16) shares bucket 3
    np.testing.assert_allclose(est.log_q(torch.tensor([[5], [19]])).numpy(), [[-math.log(16)], [-math.log(1.5)]],
                               rtol=1e-6)


def test_duplicate_ids_in_a_batch_count_once():
    once, dup = StreamingFrequencyEstimator(8, alpha=0.5), StreamingFrequencyEstimator(8, alpha=0.5)
    for step in (1, 2, 5):
        once.update(torch.tensor([1, 2]), step)
        dup.update(torch.tensor([1, 1, 2, 1, 10]), step)   # 10 collides with 2 (mod 8)
    assert torch.equal(once.A, dup.A) and torch.equal(once.B, dup.B)
    # gaps 1, 3 -> B = 1 then 0.5 * 1 + 0.5 * 3 = 2
    assert dup.B[1].item() == pytest.approx(2.0)
    assert dup.log_q(torch.tensor([1])).item() == pytest.approx(-math.log(2.0))


def test_estimates_per_step_probability_of_a_zipf_stream():
    # Each step draws b items i.i.d. from p_i ~ 1/(i+1) over 200 items. q estimates the chance
    # that an item is in a step's batch: pi_i = 1 - (1 - p_i)^b (NOT the per-draw p_i).
    n, b, steps = 200, 16, 20000
    p = 1.0 / np.arange(1, n + 1)
    p /= p.sum()
    pi = 1.0 - (1.0 - p) ** b
    rng = np.random.default_rng(0)
    draws = torch.tensor(rng.choice(n, size=(steps, b), p=p))
    est = StreamingFrequencyEstimator(num_buckets=1024, alpha=0.002)
    for t in range(steps):
        est.update(draws[t], t + 1)
    q = est.log_q(torch.arange(n)).exp().double().numpy()
    np.testing.assert_allclose(q[:20], pi[:20], rtol=0.10)            # the 20 most frequent items
    assert abs(q[0] / p[0] - 1) > 1.0                                  # per-draw p is a different quantity
    assert (np.diff(q[:20]) < 0.05).all()                              # roughly decreasing with rank


def test_state_dict_round_trip():
    est = StreamingFrequencyEstimator(32, alpha=0.1)
    for step in range(1, 30):
        est.update(torch.tensor([step % 5, 7, step % 3 + 10]), step)
    state = est.state_dict()
    assert set(state) == {"A", "B"}
    fresh = StreamingFrequencyEstimator(32, alpha=0.1)
    fresh.load_state_dict(state)
    ids = torch.arange(40)
    assert torch.equal(fresh.log_q(ids), est.log_q(ids))
    # and it keeps estimating identically after the restore
    est.update(torch.tensor([1, 2]), 31)
    fresh.update(torch.tensor([1, 2]), 31)
    assert torch.equal(fresh.B, est.B) and torch.equal(fresh.A, est.A)


def test_update_global_without_distributed_is_update():
    a, b = StreamingFrequencyEstimator(8), StreamingFrequencyEstimator(8)
    a.update(torch.tensor([1, 2]), 1); a.update(torch.tensor([2]), 3)
    b.update_global(torch.tensor([1, 2]), 1); b.update_global(torch.tensor([2]), 3)
    assert torch.equal(a.B, b.B) and torch.equal(a.A, b.A)


def test_rejects_bad_config():
    with pytest.raises(ValueError, match="alpha"):
        StreamingFrequencyEstimator(8, alpha=0.0)
    with pytest.raises(ValueError, match="num_buckets"):
        StreamingFrequencyEstimator(0)
