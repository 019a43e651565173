"""Id vocabularies: exact table sizes, raw 64-bit ids in, vocabularies carried by checkpoints
and exported towers. Expected rows are worked out by hand from the VocabEmbedding layout
(0 = missing, 1..oov = hashed out-of-vocabulary ids, then one row per vocabulary id)."""
import numpy as np
import pytest
import torch

from raycg.data.spec import FeatureSpec
from raycg.data.vocab import build_vocabularies, counts_by_attribute, select
from raycg.model.export import export_towers, load_towers, user_inputs
from raycg.model.towers import VocabEmbedding
from raycg.model.two_tower import TwoTowerModel
from raycg.model.checkpoint import load_model, save

BIG = 2**40 + 3  # a sparse 64-bit id


def test_rows_of_vocabulary_oov_and_missing_ids():
    emb = VocabEmbedding(3, 2, 4, vocab=[7, 42, BIG])
    ids = torch.tensor([-1, 7, BIG, 5, 42, 8])
    # 7 -> 1 + 2 + 0, BIG -> 1 + 2 + 2, 5 -> 1 + 5 mod 2, 42 -> 1 + 2 + 1, 8 -> 1 + 8 mod 2
    assert emb.rows(ids).tolist() == [0, 3, 5, 2, 4, 1]
    assert emb.num_buckets == 1 + 2 + 3 and emb(ids)[0].abs().sum() == 0  # missing: the zero row
    empty = VocabEmbedding(0, 3, 4)  # nothing in the vocabulary: every id is OOV
    assert empty.rows(torch.tensor([4, -1, 6])).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="sorted and unique"):
        VocabEmbedding(2, 1, 4, vocab=[9, 3])
    with pytest.raises(ValueError, match="built for 3"):
        emb.set_vocabulary([1, 2])


def test_oov_dropout_sends_vocabulary_ids_to_their_oov_row_in_training_only():
    emb = VocabEmbedding(3, 2, 4, vocab=[7, 42, BIG], oov_dropout=0.5)
    with torch.no_grad():  # row r = [r, r, r, r]: the output names the row it came from
        emb.emb.weight.copy_(torch.arange(6, dtype=torch.float32).unsqueeze(1).expand(6, 4))
    ids = torch.tensor([-1, 7, 42, BIG, 5] * 2000)
    torch.manual_seed(0)
    rows = emb(ids)[:, 0].long().view(2000, 5)
    # 7 -> 3 or its OOV row 1 + 7 mod 2 = 2; 42 -> 4 or 1; BIG -> 5 or 2; missing stays 0; OOV 5 stays 2
    assert set(rows[:, 1].tolist()) == {3, 2} and set(rows[:, 2].tolist()) == {4, 1}
    assert set(rows[:, 3].tolist()) == {5, 2}
    assert rows[:, 0].eq(0).all() and rows[:, 4].eq(2).all()
    dropped = (rows[:, 1:4] <= 2).float().mean().item()
    assert 0.46 < dropped < 0.54  # 6,000 Bernoulli(0.5) draws: sd 0.0065
    emb.eval()
    assert emb(ids[:5])[:, 0].tolist() == [0.0, 3.0, 4.0, 5.0, 2.0]  # serving: the vocabulary rows
    with pytest.raises(ValueError, match=r"oov_dropout=1.0: expected a probability"):
        VocabEmbedding(3, 2, 4, oov_dropout=1.0)


def test_select_min_count_and_cap():
    ids = np.array([5, 9, BIG, -1, 3])
    counts = np.array([2, 7, 2, 50, 1])
    assert select(ids, counts).tolist() == [3, 5, 9, BIG]          # -1 (missing) never enters
    assert select(ids, counts, min_count=2).tolist() == [5, 9, BIG]
    assert select(ids, counts, max_size=2).tolist() == [5, 9]       # 9 (7), then 5 and BIG tie at 2: 5
    assert build_vocabularies({"item": (ids, counts)}, min_count=3) == {"item": [9]}


def test_counts_by_attribute():
    # items 1, 2, 3 with 4, 1, 2 events; advertisers 10, 10, 20; item 9 is not in the table
    values, counts = counts_by_attribute(np.array([1, 2, 3, 9]), np.array([4, 1, 2, 5]),
                                         np.array([1, 2, 3]), np.array([10, 10, 20]))
    assert values.tolist() == [10, 20] and counts.tolist() == [5, 2]


CFG = {
    "cross": "parallel", "cross_layers": 1, "low_rank": None, "num_experts": 1, "mlp_dims": [16], "head_dims": [8],
    "embedding_dim": 8, "id_dim": 8, "embedding_dropout": 0.0, "cross_dropout": 0.0, "temperature": 0.1, "learn_temperature": False, "item_bias": "none",
    "heads": "unified", "serve_head": None, "sparse_tables": False,
    "history": {"layers": 1, "heads": 2, "share_item_embedding": True},
    "buckets": {"surface": 8}, "vocab": {"oov_buckets": 4},
    "vocab_sizes": {"user": 3, "context_item": 2, "query": 1, "item": 4, "advertiser": 2, "category": 2},
}
VOCAB = {"user": [1, 5, BIG], "context_item": [7, BIG], "query": [3], "item": [7, 11, 12, BIG],
         "advertiser": [2, 9], "category": [0, 4]}


def _batch(n=6):
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([7, 11, BIG, 99, -1, 12])[:n]
    return {"user_cat": torch.stack([torch.tensor([1, 5, BIG, 2, 1, 5])[:n], torch.zeros(n, dtype=torch.int64),
                                     ids, torch.full((n,), -1)], 1),
            "user_dense": torch.randn(n, 2, generator=g), "hist_items": torch.stack([ids, ids.flip(0)], 1),
            "hist_actions": torch.ones(n, 2, dtype=torch.int64),
            "item_cat": torch.stack([ids.clamp(min=0), torch.tensor([2, 9, 9, 2, 2, 3])[:n],
                                     torch.tensor([0, 4, 4, 0, 0, 4])[:n]], 1),
            "item_dense": torch.randn(n, 3, generator=g)}


def test_vocabularies_travel_with_checkpoints_and_exports(tmp_path):
    torch.manual_seed(0)
    spec = FeatureSpec(user_dense=2, item_dense=3, history_length=2)
    model = TwoTowerModel(CFG, spec)
    model.set_vocabularies(VOCAB)
    model.eval()
    items = model.item_tower.embeddings[0]
    assert items.num_buckets == 1 + 4 + 4 and model.user_tower.history.items is items  # exact size, shared
    batch = _batch()
    with torch.no_grad():
        want_u, want_i = model.embed_users(batch), model.embed_items(batch)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save(str(ckpt), model, torch.optim.Adam(model.parameters()), 0, {"model": CFG}, spec.to_dict())
    loaded, _ = load_model(str(ckpt))
    assert loaded.item_tower.embeddings[0].vocab.tolist() == VOCAB["item"]
    with torch.no_grad():
        assert torch.equal(loaded.embed_users(batch), want_u) and torch.equal(loaded.embed_items(batch), want_i)
    # the exported towers take raw ids (the vocabulary is inside them)
    export_towers(loaded, str(tmp_path / "export"))
    user, item, _ = load_towers(str(tmp_path / "export"))
    with torch.no_grad():
        assert (user(*user_inputs(batch)) - want_u).abs().max() < 1e-5
        assert (item(batch["item_cat"], batch["item_dense"]) - want_i).abs().max() < 1e-5
    # a vocabulary id and an OOV id that shares no row with it embed differently
    assert not torch.equal(items(torch.tensor([BIG])), items(torch.tensor([99])))
