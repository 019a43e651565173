import time, torch, warnings
from raycg.data.spec import FeatureSpec
from raycg.model.two_tower import TwoTowerModel
from raycg.model.export import UserTowerForServing, ItemTowerForServing, user_inputs
from raycg.model.card import example_batch
CFG = {"cross": "parallel", "cross_layers": 2, "low_rank": 4, "num_experts": 2, "mlp_dims": [32, 16, 8],
    "head_dims": [16], "embedding_dim": 8, "id_dim": 8, "temperature": 0.07, "heads": "multi_head",
    "buckets": {"user": 50, "surface": 8, "context_item": 50, "query": 10, "item": 50, "advertiser": 10, "category": 10},
    "vocab_sizes": {"item": 4, "user": 3}, "vocab": {"oov_buckets": 4}, "history": {"share_item_embedding": True}}
spec = FeatureSpec(user_dense=3, item_dense=5, history_length=6)
m = TwoTowerModel(CFG, spec).eval()
m.set_vocabularies({"item": [7, 11, 99, 2**40], "user": [1, 5, 2**41]})
ex = example_batch(m, 4)
batch = torch.export.Dim("batch", min=1)
t0 = time.time()
with torch.no_grad():
    ep = torch.export.export(UserTowerForServing(m), user_inputs(ex), dynamic_shapes=({0: batch}, {0: batch}, {0: batch}, {0: batch}))
    epi = torch.export.export(ItemTowerForServing(m), (ex["item_cat"], ex["item_dense"]), dynamic_shapes=({0: batch}, {0: batch}))
print("export s", time.time()-t0)
torch.export.save(ep, "/tmp/u.pt2"); torch.export.save(epi, "/tmp/i.pt2")
u = torch.export.load("/tmp/u.pt2").module(); i = torch.export.load("/tmp/i.pt2").module()
for n in (1, 2, 33):
    b = {k: v[:1].repeat(n, *[1]*(v.dim()-1)) for k, v in ex.items()}
    b["user_cat"] = torch.randint(-1, 60, (n, 4)); b["user_cat"][:, 1] = 1
    b["hist_items"] = torch.randint(-1, 60, (n, 6)); b["hist_actions"] = torch.randint(0, 5, (n, 6)); b["hist_actions"][0] = 0
    b["user_dense"] = torch.randn(n, 3); b["item_dense"] = torch.randn(n, 5); b["item_cat"] = torch.randint(0, 60, (n, 3))
    with torch.no_grad():
        print(n, (u(*user_inputs(b)) - m.embed_users(b)).abs().max().item(), (i(b["item_cat"], b["item_dense"]) - m.embed_items(b)).abs().max().item())
