"""The repeat-match channel (raycg.model.repeat_match): codes against splitmix64 computed in
plain Python, the history term by hand, and the served inner product of the model."""
import math

import pytest
import torch

from raycg.model.repeat_match import RepeatMatch, item_codes

MASK = (1 << 64) - 1


def splitmix64_bit0(x: int) -> int:
    """Bit 0 of splitmix64's finaliser of x (mod 2^64), as published (Steele et al. 2014)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return (x ^ (x >> 31)) & 1


@pytest.mark.parametrize("item_id", [0, 7, 123_456_789, -5, 2**62 + 3])
def test_codes_are_signs_of_splitmix64(item_id):
    D = 16
    got = item_codes(torch.tensor([item_id]), D)[0]
    want = [(2 * splitmix64_bit0((item_id * D + j) & MASK) - 1) / math.sqrt(D) for j in range(D)]
    torch.testing.assert_close(got, torch.tensor(want))


def test_codes_match_themselves_and_are_near_orthogonal_to_others():
    D = 256
    c = item_codes(torch.arange(2000) * 7919, D)
    gram = c @ c.T
    torch.testing.assert_close(gram.diagonal(), torch.ones(2000))
    off = gram[~torch.eye(2000, dtype=torch.bool)]
    assert abs(off.mean().item()) < 0.005 and abs(off.std().item() * math.sqrt(D) - 1) < 0.05


def test_the_history_term_by_hand():
    """history [-1, 12, 40, 12], actions [0, 1, 4, 2]: m = w[1, r=2] c(12) + w[4, r=1] c(40)
    + w[2, r=0] c(12), padding ignored; an empty history gives zeros."""
    match = RepeatMatch(dim=64, max_len=4, init=1.0)
    with torch.no_grad():
        match.weight.copy_(torch.arange(20, dtype=torch.float32).reshape(5, 4) / 10)
    items = torch.tensor([[-1, 12, 40, 12], [-1, -1, -1, -1]])
    actions = torch.tensor([[0, 1, 4, 2], [0, 0, 0, 0]])
    w = match.weight
    c = item_codes(torch.tensor([12, 40]), 64)
    want = w[1, 2] * c[0] + w[4, 1] * c[1] + w[2, 0] * c[0]
    out = match(items, actions)
    torch.testing.assert_close(out[0], want)
    assert torch.all(out[1] == 0)


def test_the_model_serves_the_match_as_part_of_one_inner_product():
    """<[u, T, T m], [v, b, c]> / T = <u, v> / T + b + <m, c>: a candidate in the user's history
    scores about w (here 3 per occurrence) above the same model without the channel."""
    from tests.test_model import _batch, _model_cfg, _spec
    from raycg.model.two_tower import TwoTowerModel

    torch.manual_seed(0)
    base = dict(_model_cfg("parallel"), item_bias="learned", learn_temperature=False, temperature=0.25)
    cfg = dict(base, history=dict(base["history"], match_dim=2048, match_init=3.0))
    model = TwoTowerModel(cfg, _spec()).eval()
    batch = _batch()
    batch["hist_items"][0] = torch.tensor([2, 5, 5, 9])  # user 0: items 2, 9 once, 5 twice
    batch["hist_actions"][0] = torch.tensor([1, 1, 2, 4])
    with torch.no_grad():
        users, items = model.embed_users(batch), model.embed_items(batch)
    E = cfg["embedding_dim"]
    assert model.score_extras == 1 + 2048 and users.shape == items.shape == (6, E + 1 + 2048)
    score = users @ items.T / 0.25
    plain = users[:, :E + 1] @ items[:, :E + 1].T / 0.25
    extra = (score - plain)[0]  # user 0 against items 0..5 (the batch's item ids are 0..5)
    torch.testing.assert_close(extra[[2, 5]], torch.tensor([3.0, 6.0]), atol=0.5, rtol=0)
    assert extra[[0, 1, 3, 4]].abs().max() < 0.5  # not in the history: noise of order 3 sqrt(4 / 2048)


@pytest.mark.gpu
def test_codes_and_the_history_term_are_the_same_on_cuda():
    """int64 products wrap the same way on the GPU: the codes (and so the exported towers'
    vectors) do not depend on where they are computed."""
    ids = torch.tensor([0, 7, -5, 2**62 + 3, 123_456_789_012])
    torch.testing.assert_close(item_codes(ids.cuda(), 64).cpu(), item_codes(ids, 64), rtol=0, atol=0)
    match = RepeatMatch(dim=64, max_len=3, init=2.0)
    items, actions = torch.tensor([[-1, 12, 40]]), torch.tensor([[0, 1, 4]])
    torch.testing.assert_close(match.cuda()(items.cuda(), actions.cuda()).cpu(),
                               match.cpu()(items, actions))


def test_the_match_reads_further_back_than_the_encoder():
    """match_length 6, length 3: the data packs 6 actions; the three older ones move only the
    match columns of the user vector, the encoder reads the last three."""
    from tests.test_model import _model_cfg
    from raycg.data.spec import FeatureSpec
    from raycg.model.repeat_match import history_lookup_length
    from raycg.model.two_tower import TwoTowerModel

    history = {"length": 3, "layers": 1, "heads": 2, "share_item_embedding": False,
               "match_dim": 16, "match_length": 6, "match_init": 1.0}
    assert history_lookup_length(history) == 6
    assert history_lookup_length(dict(history, match_dim=0)) == 3  # no channel: the encoder's length
    assert history_lookup_length(dict(history, length=0)) == 0  # no history at all
    torch.manual_seed(0)
    model = TwoTowerModel(dict(_model_cfg("parallel"), history=history),
                          FeatureSpec(user_dense=3, item_dense=5, history_length=6)).eval()
    assert model.user_tower.history.max_len == 3
    n = 4
    batch = {"user_cat": torch.zeros(n, 4, dtype=torch.long), "user_dense": torch.zeros(n, 3),
             "hist_items": torch.arange(n * 6).reshape(n, 6), "hist_actions": torch.ones(n, 6, dtype=torch.long)}
    older = dict(batch, hist_items=batch["hist_items"].clone())
    older["hist_items"][:, :3] += 100
    with torch.no_grad():
        a, b = model.embed_users(batch), model.embed_users(older)
    assert torch.equal(a[:, :-16], b[:, :-16]) and not torch.allclose(a[:, -16:], b[:, -16:])


def test_codes_of_repeated_ids_are_hashed_once_and_equal_hashing_each():
    match = RepeatMatch(dim=32, max_len=4)
    ids = torch.tensor([[5, 9, 5, -3], [9, 9, 2**40, 5]])
    assert torch.equal(match.codes(ids), item_codes(ids, 32))  # bit for bit: same hash, gathered
