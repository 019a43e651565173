"""Losses against values computed by hand / numpy (not by the code under test)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raycg.losses.advertiser import advertiser_softmax_loss
from raycg.losses.softmax import duration_weight, example_weights, in_batch_softmax_loss, sampled_softmax_loss


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


@pytest.mark.parametrize("t_max", [0.0, -5.0])
def test_duration_weight_rejects_bad_t_max(t_max):
    # duration *values* are checked by data validation (tests/test_schema.py: click_duration),
    # so that the loss never reads tensors back to the host
    with pytest.raises(ValueError, match="t_max"):
        duration_weight(torch.tensor([1.0, 2.0]), t_max)


def test_example_weights_per_event_kind():
    # signals: is_conversion, is_click, is_save, duration
    s = torch.tensor([[1, 0, 0, 0.0], [0, 1, 0, 9.0], [0, 0, 1, 0.0], [0, 1, 0, 0.0]])
    cfg = {"conversion_weight": 2.0, "engagement_weight": 0.5, "t_max": 9.0, "duration_weighting": True}
    np.testing.assert_allclose(example_weights(s, cfg).numpy(), [2.0, 0.5, 0.5, 0.0], atol=1e-7)
    cfg["duration_weighting"] = False
    np.testing.assert_allclose(example_weights(s, cfg).numpy(), [2.0, 0.5, 0.5, 0.5], atol=1e-7)


# -- sampled softmax: shared (mixed / cross-worker) and hard negatives, logQ -------------------

def unit(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_sampled_loss(u, v, ids, w, T, cand=None, cand_ids=None, hard=None, hard_ids=None,
                    pos_lq=None, cand_lq=None, hard_lq=None, mask=True):
    """Row by row: list (kind, embedding, id, log q) for every candidate, then weighted CE."""
    B = len(u)
    total = 0.0
    for i in range(B):
        cands = [("target" if j == i else "batch", v[j], ids[j], 0.0 if pos_lq is None else pos_lq[j])
                 for j in range(B)]
        if cand is not None:
            cands += [("shared", cand[n], cand_ids[n], 0.0 if cand_lq is None else cand_lq[n])
                      for n in range(len(cand))]
        if hard is not None:
            cands += [("hard", hard[i, k], hard_ids[i, k], 0.0 if hard_lq is None else hard_lq[i, k])
                      for k in range(hard.shape[1])]
        logits, target = [], None
        for kind, emb, cid, lq in cands:
            if kind == "target":
                target = len(logits)
            elif kind == "hard" and cid == -1:
                continue                                     # padded hard negative
            elif mask and cid == ids[i]:
                continue                                     # accidental hit
            logits.append(float(u[i] @ emb) / T - lq)
        logits = np.array(logits)
        m = logits.max()
        total += w[i] * (m + np.log(np.exp(logits - m).sum()) - logits[target])
    return total / B


@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("log_q", [False, True])
def test_sampled_softmax_matches_numpy(mask, log_q):
    rng = np.random.default_rng(2)
    B, N, H, d, T = 5, 4, 3, 6, 0.3
    u, v = unit(rng, B, d), unit(rng, B, d)
    ids = np.array([7, 8, 7, 9, 10])                      # in-batch accidental hit: rows 0, 2
    cand, cand_ids = unit(rng, N, d), np.array([11, 8, 12, 13])   # shared hit for row 1
    hard, hard_ids = unit(rng, B, H, d), np.array(
        [[20, 21, -1], [22, -1, -1], [7, 23, 24], [25, 26, 27], [10, 28, -1]])  # hits: rows 2, 4
    w = np.array([1.0, 0.5, 2.0, 0.0, 1.5])
    lq = dict(pos_lq=np.log(rng.uniform(0.01, 0.5, B)), cand_lq=np.log(rng.uniform(0.01, 0.5, N)),
              hard_lq=np.log(rng.uniform(0.01, 0.5, (B, H)))) if log_q else {}
    t = torch.tensor
    got = sampled_softmax_loss(
        t(u), t(v), t(ids), t(w), T, cand_emb=t(cand), cand_ids=t(cand_ids), hard_emb=t(hard),
        hard_ids=t(hard_ids), mask_accidental_hits=mask,
        **({"pos_log_q": t(lq["pos_lq"]), "cand_log_q": t(lq["cand_lq"]), "hard_log_q": t(lq["hard_lq"])}
           if log_q else {}))
    want = np_sampled_loss(u, v, ids, w, T, cand, cand_ids, hard, hard_ids, mask=mask, **lq)
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_sampled_softmax_without_extras_is_in_batch_softmax():
    rng = np.random.default_rng(3)
    u, v = unit(rng, 4, 3), unit(rng, 4, 3)
    ids, w = np.array([1, 2, 1, 3]), np.array([1.0, 2.0, 0.5, 1.0])
    t = torch.tensor
    want = np_loss(u, v, ids, w, 0.5)
    assert in_batch_softmax_loss(t(u), t(v), t(ids), t(w), 0.5).item() == pytest.approx(want, rel=1e-9)
    # empty extra candidate sets ([0, d], [B, 0, d]) change nothing
    got = sampled_softmax_loss(t(u), t(v), t(ids), t(w), 0.5, cand_emb=torch.zeros(0, 3, dtype=torch.float64),
                               cand_ids=torch.zeros(0, dtype=torch.int64),
                               hard_emb=torch.zeros(4, 0, 3, dtype=torch.float64),
                               hard_ids=torch.zeros(4, 0, dtype=torch.int64))
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_log_q_correction_sign():
    # identical embeddings everywhere: without correction every row's loss is log(B).
    # logit = s - log q, so a popular candidate (large q) gets a LOWER logit:
    #   the row whose positive is popular has a larger loss, the other row a smaller one.
    u = torch.ones(2, 2) / math.sqrt(2)
    ids, w = torch.tensor([0, 1]), torch.ones(2)
    q = torch.tensor([0.8, 0.2])
    # CE of one row = B * loss with that row's weight 1 and the other's 0
    per_row = [2 * sampled_softmax_loss(u, u, ids, row_w, 1.0, pos_log_q=q.log())
               for row_w in (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))]
    # by hand: logits are s - log q with equal s, i.e. softmax weights proportional to 1/q
    assert per_row[0].item() == pytest.approx(-math.log((1 / 0.8) / (1 / 0.8 + 1 / 0.2)), rel=1e-6)
    assert per_row[1].item() == pytest.approx(-math.log((1 / 0.2) / (1 / 0.8 + 1 / 0.2)), rel=1e-6)
    assert per_row[0].item() > math.log(2) > per_row[1].item()
    # the shared-candidate correction has the same sign: a popular shared negative hurts less
    cand = u[:1]
    lo = sampled_softmax_loss(u, u, ids, w, 1.0, cand_emb=cand, cand_log_q=torch.tensor([math.log(0.9)]))
    hi = sampled_softmax_loss(u, u, ids, w, 1.0, cand_emb=cand, cand_log_q=torch.tensor([math.log(0.1)]))
    assert lo.item() == pytest.approx(math.log(1 + 1 + 1 / 0.9), rel=1e-6)
    assert hi.item() == pytest.approx(math.log(1 + 1 + 1 / 0.1), rel=1e-6)


def test_hard_negative_padding_and_hits_are_masked():
    # row 0's hard negatives: one padding (-1), one equal to its own positive (id 5), identical
    # embeddings everywhere. Only the other in-batch positive remains a negative: loss log 2.
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    hard = e[:, None, :].expand(2, 2, 2)
    hard_ids = torch.tensor([[-1, 5], [-1, -1]])
    loss = sampled_softmax_loss(e, e, torch.tensor([5, 6]), torch.ones(2), 1.0, hard_emb=hard, hard_ids=hard_ids)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    unmasked = sampled_softmax_loss(e, e, torch.tensor([5, 6]), torch.ones(2), 1.0, hard_emb=hard,
                                    hard_ids=hard_ids, mask_accidental_hits=False)
    assert unmasked.item() == pytest.approx((math.log(3) + math.log(2)) / 2, rel=1e-6)  # padding stays masked


def test_sampled_softmax_gradients_flow_to_all_candidate_kinds():
    rng = np.random.default_rng(4)
    u, v = (torch.tensor(unit(rng, 3, 4), requires_grad=True) for _ in range(2))
    cand = torch.tensor(unit(rng, 2, 4), requires_grad=True)
    hard = torch.tensor(unit(rng, 3, 2, 4), requires_grad=True)
    temp = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    loss = sampled_softmax_loss(u, v, torch.arange(3), torch.ones(3, dtype=torch.float64), temp,
                                cand_emb=cand, cand_ids=torch.tensor([10, 11]), hard_emb=hard,
                                hard_ids=torch.tensor([[20, -1], [21, 22], [23, 24]]))
    loss.backward()
    for t in (u, v, cand, hard, temp):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert (hard.grad[0, 1] == 0).all()                   # the padded hard negative gets no gradient


# -- advertiser softmax ----------------------------------------------------------------------

def np_advertiser_loss(u, v, adv, w, T):
    advs = sorted(set(adv.tolist()))
    E = []
    for a in advs:
        m = v[adv == a].mean(axis=0)
        E.append(m / np.linalg.norm(m))
    E = np.array(E)
    total = 0.0
    for i in range(len(u)):
        logits = E @ u[i] / T
        mx = logits.max()
        total += w[i] * (mx + np.log(np.exp(logits - mx).sum()) - logits[advs.index(adv[i])])
    return total / len(u)


def test_advertiser_softmax_matches_numpy():
    rng = np.random.default_rng(5)
    u, v = unit(rng, 6, 4), unit(rng, 6, 4)
    adv = np.array([30, 10, 30, 20, 10, 30])
    w = np.array([1.0, 0.0, 2.0, 1.0, 0.0, 0.5])          # zero rows: non-conversions
    t = torch.tensor
    got = advertiser_softmax_loss(t(u), t(v), t(adv), t(w), 0.2)
    assert got.item() == pytest.approx(np_advertiser_loss(u, v, adv, w, 0.2), rel=1e-9)


def test_advertiser_softmax_gradients_match_the_formula():
    # reference straight from the module docstring's formula: K unique advertisers, e_k = the
    # normalised mean of their items, CE over K columns (data-dependent shapes, fine in a test)
    def reference(u, v, adv, w, T):
        uniq, inv = torch.unique(adv, return_inverse=True)
        e = torch.stack([torch.nn.functional.normalize(v[adv == a].mean(0), dim=0) for a in uniq])
        return (w * torch.nn.functional.cross_entropy(u @ e.T / T, inv, reduction="none")).sum() / len(u)

    rng = np.random.default_rng(11)
    u0, v0 = torch.tensor(unit(rng, 12, 5)), torch.tensor(unit(rng, 12, 5))
    adv = torch.tensor([4, 9, 4, 1, 9, 9, 2, 4, 1, 7, 7, 4])
    w = torch.tensor(rng.random(12) * (rng.random(12) > 0.3))
    grads = []
    for fn in (advertiser_softmax_loss, reference):
        u, v = u0.clone().requires_grad_(), v0.clone().requires_grad_()
        loss = fn(u, v, adv, w, 0.3)
        loss.backward()
        grads.append((loss.detach(), u.grad, v.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_advertiser_softmax_same_advertiser_rows_are_not_negatives():
    # two rows of one advertiser, orthogonal items: the item softmax punishes each row with the
    # other's item; the advertiser softmax has a single advertiser column, loss 0.
    u = v = torch.eye(2)
    adv = torch.tensor([3, 3])
    assert advertiser_softmax_loss(u, v, adv, torch.ones(2), 1.0).item() == pytest.approx(0.0, abs=1e-7)
    assert in_batch_softmax_loss(u, v, torch.tensor([0, 1]), torch.ones(2), 1.0).item() > 0.3
    # two advertisers: advertiser embeddings e_1 = [1,0], e_2 = [0,1]; row 0 converts with adv 1
    adv = torch.tensor([1, 2])
    got = advertiser_softmax_loss(u, v, adv, torch.tensor([1.0, 0.0]), 1.0)
    assert got.item() == pytest.approx(math.log(1 + math.exp(-1)) / 2, rel=1e-6)   # / B, not / #conversions


def test_advertiser_softmax_blocks_are_separate_softmaxes_over_their_own_advertisers():
    # 7 rows in blocks of 3: [0:3], [3:6] and the shorter [6:7]; each block scores against the
    # advertisers of its own rows only (numpy golden per block), and the loss divides by all 7 rows
    rng = np.random.default_rng(8)
    u, v = unit(rng, 7, 4), unit(rng, 7, 4)
    adv = np.array([5, 6, 5, 6, 7, 8, 5])   # adv 5: in block 0 twice and alone in block 2
    w = np.array([1.0, 0.5, 0.0, 2.0, 1.0, 0.0, 1.5])
    want = sum(np_advertiser_loss(u[b], v[b], adv[b], w[b], 0.3) * len(u[b])
               for b in (slice(0, 3), slice(3, 6), slice(6, 7))) / 7
    t = torch.tensor
    got = advertiser_softmax_loss(t(u), t(v), t(adv), t(w), 0.3, block_rows=3)
    assert got.item() == pytest.approx(want, rel=1e-9)
    whole = advertiser_softmax_loss(t(u), t(v), t(adv), t(w), 0.3)
    assert whole.item() == pytest.approx(np_advertiser_loss(u, v, adv, w, 0.3), rel=1e-9)
    assert abs(got.item() - whole.item()) > 1e-3           # fewer candidates: a different loss
    for n in (7, 100, None):                                # a block of all rows is the single softmax
        assert advertiser_softmax_loss(t(u), t(v), t(adv), t(w), 0.3, block_rows=n).item() == pytest.approx(whole.item(), rel=1e-12)
    with pytest.raises(ValueError, match="advertiser_block_rows must be > 0"):
        advertiser_softmax_loss(t(u), t(v), t(adv), t(w), 0.3, block_rows=0)


@pytest.mark.gpu
def test_compiled_loss_kernels_equal_the_eager_ones_on_cuda():
    """`trainer.compile` compiles the loss kernels; on CUDA they must give the eager values,
    including rows that repeat an item or an advertiser, padded hard negatives and rows with
    weight 0 (a NaN there is a NaN loss; seen on an H200 with loss=full)."""
    from raycg.losses.objective import EAGER, LossKernels

    g = torch.Generator().manual_seed(3)
    B, N, H, d = 64, 48, 2, 16
    emb = lambda *s: F.normalize(torch.randn(*s, d, generator=g), dim=-1).cuda()  # noqa: E731
    u, v, cand, hard = emb(B), emb(B), emb(N), emb(B, H)
    pos_ids = torch.randint(0, 20, (B,), generator=g).cuda()           # repeats: accidental hits
    cand_ids = torch.randint(0, 40, (N,), generator=g).cuda()
    hard_ids = torch.randint(-1, 30, (B, H), generator=g).cuda()       # -1: padding
    adv = torch.randint(0, 7, (B,), generator=g).cuda()                # repeated advertisers
    w = (torch.rand(B, generator=g) < 0.3).float().cuda()              # mostly 0, as conversion weights
    log_q = -torch.rand(B, generator=g).cuda() * 5
    compiled = LossKernels.compiled()
    for mask in (True, False):
        args = dict(cand_emb=cand, cand_ids=cand_ids, hard_emb=hard, hard_ids=hard_ids, pos_log_q=log_q,
                    mask_accidental_hits=mask)
        want = EAGER.softmax(u, v, pos_ids, w, 0.05, **args)
        got = compiled.softmax(u, v, pos_ids, w, 0.05, **args)
        assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), rel=1e-4)
    for block_rows in (None, 16, 24):   # 24: two blocks of 24 and a last one of 16
        want = EAGER.advertiser(u, v, adv, w, 0.05, block_rows)
        got = compiled.advertiser(u, v, adv, w, 0.05, block_rows)
        assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), rel=1e-4)
