"""The composed objective: heads, task weights and the advertiser term add up as documented."""
import math

import pytest
import torch
import torch.nn.functional as F

from raycg.losses.advertiser import advertiser_softmax_loss
from raycg.losses.frequency import StreamingFrequencyEstimator
from raycg.losses.objective import Candidates, mixed_log_q, training_loss
from raycg.losses.softmax import in_batch_softmax_loss, sampled_softmax_loss

CFG = {"conversion_weight": 2.0, "engagement_weight": 0.5, "t_max": 10.0, "duration_weighting": True,
       "mask_accidental_hits": True, "log_q_correction": False, "cross_worker_negatives": False,
       "advertiser_weight": 0.0, "advertiser_block_rows": None}


def _batch():
    g = torch.Generator().manual_seed(0)
    signals = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 10.0], [0, 0, 1, 0], [0, 1, 0, 3.0]])
    item_cat = torch.tensor([[11, 1, 0], [12, 1, 0], [13, 2, 0], [11, 1, 0]])
    emb = lambda: F.normalize(torch.randn(4, 3, generator=g), dim=-1)  # noqa: E731
    return {"signals": signals, "item_cat": item_cat}, emb


def test_unified_is_one_softmax_with_summed_task_weights():
    batch, emb = _batch()
    u, v = emb(), emb()
    loss, parts = training_loss({"unified": u}, {"unified": v}, batch, CFG, 0.5)
    w = torch.tensor([2.0, 0.5, 0.5, 0.5 * math.log(4) / math.log(11)])
    assert loss.item() == pytest.approx(in_batch_softmax_loss(u, v, batch["item_cat"][:, 0], w, 0.5).item(), rel=1e-6)
    assert set(parts) == {"loss_unified"}


def test_multi_head_sums_one_softmax_per_task():
    batch, emb = _batch()
    uc, vc, ue, ve = emb(), emb(), emb(), emb()
    loss, parts = training_loss({"conversion": uc, "engagement": ue}, {"conversion": vc, "engagement": ve},
                                batch, CFG, 0.5)
    ids = batch["item_cat"][:, 0]
    conv = in_batch_softmax_loss(uc, vc, ids, torch.tensor([2.0, 0, 0, 0]), 0.5)
    eng = in_batch_softmax_loss(ue, ve, ids, torch.tensor([0, 0.5, 0.5, 0.5 * math.log(4) / math.log(11)]), 0.5)
    assert loss.item() == pytest.approx((conv + eng).item(), rel=1e-6)
    assert parts["loss_conversion"].item() == pytest.approx(conv.item()) and parts["loss_engagement"].item() == pytest.approx(eng.item())


def test_advertiser_term_is_added_with_its_coefficient():
    batch, emb = _batch()
    u, v = emb(), emb()
    base, _ = training_loss({"unified": u}, {"unified": v}, batch, CFG, 0.5)
    with_adv, parts = training_loss({"unified": u}, {"unified": v}, batch, dict(CFG, advertiser_weight=0.3), 0.5)
    adv = advertiser_softmax_loss(u, v, batch["item_cat"][:, 1], torch.tensor([2.0, 0, 0, 0]), 0.5)
    assert with_adv.item() == pytest.approx(base.item() + 0.3 * adv.item(), rel=1e-6)
    assert parts["loss_advertiser"].item() == pytest.approx(0.3 * adv.item(), rel=1e-6)


def test_log_q_and_mixed_candidates_are_wired_through():
    batch, emb = _batch()
    u, v, m = emb(), emb(), emb()[:2]
    freq = StreamingFrequencyEstimator(100)
    for step, ids in enumerate([[11, 12], [11, 13], [11, 12], [11]]):
        freq.update(torch.tensor(ids), step)
    cfg = dict(CFG, log_q_correction=True)
    extra = Candidates(mixed={"unified": m}, mixed_ids=torch.tensor([50, 11]), mixed_log_q=mixed_log_q(2, 1000))
    loss, _ = training_loss({"unified": u}, {"unified": v}, batch, cfg, 0.5, extra, freq)
    ids = batch["item_cat"][:, 0]
    w = torch.tensor([2.0, 0.5, 0.5, 0.5 * math.log(4) / math.log(11)])
    expected = sampled_softmax_loss(u, v, ids, w, 0.5, cand_emb=m, cand_ids=torch.tensor([50, 11]),
                                    pos_log_q=freq.log_q(ids), cand_log_q=torch.full((2,), mixed_log_q(2, 1000)))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_mixed_log_q_is_per_step_inclusion_probability():
    # P(item among M uniform draws from C) = 1 - (1 - 1/C)^M
    assert math.exp(mixed_log_q(10, 100)) == pytest.approx(1 - 0.99 ** 10, rel=1e-12)
