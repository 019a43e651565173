"""Checkpoints and exports are verified: damaged files are errors that name the file, and a
run falls back to its newest intact checkpoint."""
import json
import os

import numpy as np
import pytest
import torch

from raycg.checksums import DamagedFileError, verify_checksums
from raycg.data.spec import FeatureSpec
from raycg.model.export import export_towers
from raycg.model.two_tower import TwoTowerModel
from raycg.model import checkpoint as ckpt_io
from raycg.train.loop import forget_epochs_from

CFG = {"cross": "parallel", "cross_layers": 1, "low_rank": None, "num_experts": 1, "mlp_dims": [8], "head_dims": [8],
       "embedding_dim": 4, "id_dim": 4, "embedding_dropout": 0.0, "cross_dropout": 0.0, "temperature": 0.1, "learn_temperature": False, "item_bias": "none",
       "heads": "unified", "serve_head": None, "sparse_tables": False,
       "buckets": {"user": 11, "surface": 4, "context_item": 11, "query": 5, "item": 11, "advertiser": 5,
                   "category": 5}}


def saved(directory: str, epoch: int = 0, seed: int = 0) -> TwoTowerModel:
    os.makedirs(directory, exist_ok=True)
    torch.manual_seed(seed)
    model = TwoTowerModel(CFG, FeatureSpec(user_dense=2, item_dense=3))
    ckpt_io.save(directory, model, torch.optim.Adam(model.parameters()), epoch, {"model": CFG},
                 FeatureSpec(user_dense=2, item_dense=3).to_dict())
    return model


def damage(path: str, nbytes: int = 512, seed: int = 0) -> None:
    """Overwrite `nbytes` bytes in the middle of a file with random bytes (the size stays)."""
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    data[mid:mid + nbytes] = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    open(path, "wb").write(bytes(data))


def test_intact_checkpoint_round_trip(tmp_path):
    model = saved(str(tmp_path))
    assert set(json.loads((tmp_path / "checksums.json").read_text())) == {"model.pt", "meta.json"}
    loaded, _ = ckpt_io.load_model(str(tmp_path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_damaged_bytes_are_an_error_naming_the_file(tmp_path):
    saved(str(tmp_path))
    damage(str(tmp_path / "model.pt"))
    with pytest.raises(ckpt_io.CheckpointError, match=r"model\.pt: damaged: SHA-256"):
        ckpt_io.load_state(str(tmp_path))
    with pytest.raises(ckpt_io.CheckpointError, match=r"model\.pt: damaged"):
        ckpt_io.load_model(str(tmp_path))


@pytest.mark.parametrize("keep_bytes", [0, 100])
def test_truncated_or_empty_file_without_checksums_names_the_file(tmp_path, keep_bytes):
    # a checkpoint from before checksums existed: torch's own error, with the path added
    saved(str(tmp_path))
    os.remove(tmp_path / "checksums.json")
    data = open(tmp_path / "model.pt", "rb").read()
    open(tmp_path / "model.pt", "wb").write(data[:keep_bytes])
    with pytest.warns(UserWarning, match="no checksums.json"), \
            pytest.raises(ckpt_io.CheckpointError, match=rf"{tmp_path}/model\.pt: cannot load"):
        ckpt_io.load_state(str(tmp_path))


def test_newest_intact_skips_damaged_checkpoints(tmp_path):
    run = tmp_path / "run"
    for i, stamp in enumerate(["2026-01-01_00-00-01", "2026-01-01_00-00-02", "2026-01-01_00-00-03"]):
        saved(str(run / f"checkpoint_{stamp}"), epoch=i)
    damage(str(run / "checkpoint_2026-01-01_00-00-03" / "model.pt"))
    os.remove(run / "checkpoint_2026-01-01_00-00-02" / "meta.json")
    said = []
    found = ckpt_io.newest_intact(str(run), log=said.append)
    assert found.endswith("checkpoint_2026-01-01_00-00-01")
    assert len(said) == 2 and "00-00-03" in said[0] and "damaged" in said[0] and "meta.json: missing" in said[1]
    damage(found + "/model.pt")
    with pytest.raises(ckpt_io.CheckpointError, match="no intact checkpoint among 3"):
        ckpt_io.newest_intact(str(run), log=said.append)
    with pytest.raises(ckpt_io.CheckpointError, match="no checkpoint_"):
        ckpt_io.newest_intact(str(tmp_path / "empty"))


def test_export_carries_checksums(tmp_path):
    export_towers(TwoTowerModel(CFG, FeatureSpec(user_dense=2, item_dense=3)), str(tmp_path))
    assert set(json.loads((tmp_path / "checksums.json").read_text())) == {
        "user_tower.pt2", "item_tower.pt2", "feature_spec.json"}
    verify_checksums(str(tmp_path))
    damage(str(tmp_path / "item_tower.pt2"), nbytes=64)
    with pytest.raises(DamagedFileError, match=r"item_tower\.pt2: damaged"):
        verify_checksums(str(tmp_path))


def test_metrics_of_epochs_trained_again_are_forgotten(tmp_path):
    # a worker stopped after writing epoch 2's line, before Ray committed its checkpoint:
    # the run resumes after epoch 1 and trains epoch 2 again
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"epoch": e, "loss": 1.0 / (e + 1)}) + "\n" for e in (0, 1, 2)))
    forget_epochs_from(str(path), 2)
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [0, 1]
    forget_epochs_from(str(tmp_path / "absent.jsonl"), 0)  # nothing to do


def test_evaluation_uses_the_best_checkpoint_when_there_is_one(tmp_path):
    run = tmp_path / "run"
    saved(str(run / "checkpoint_2026-01-01_00-00-02"), epoch=3)
    assert ckpt_io.evaluation_checkpoint(str(run)).endswith("checkpoint_2026-01-01_00-00-02")
    saved(str(run / "best"), epoch=1)
    assert ckpt_io.evaluation_checkpoint(str(run)) == str(run / "best")
    damage(str(run / "best" / "model.pt"))
    said = []
    assert ckpt_io.evaluation_checkpoint(str(run), log=said.append).endswith("00-00-02")
    assert "best checkpoint is damaged" in said[0]


def test_a_checkpoint_from_before_every_key_was_required_still_loads(tmp_path):
    # older runs saved model configs without these keys (the code then assumed a value for each);
    # a composed config must have every key, a stored one gets what that code assumed
    old = {k: v for k, v in CFG.items()
           if k not in ("num_experts", "embedding_dropout", "cross_dropout", "learn_temperature", "item_bias", "serve_head", "sparse_tables")}
    spec = FeatureSpec(user_dense=2, item_dense=3)
    torch.manual_seed(0)
    model = TwoTowerModel(CFG, spec)
    ckpt_io.save(str(tmp_path), model, torch.optim.Adam(model.parameters()), 0, {"model": old}, spec.to_dict())
    with pytest.raises(KeyError):
        TwoTowerModel(old, spec)
    loaded, config = ckpt_io.load_model(str(tmp_path))
    assert config["model"]["num_experts"] == 1 and config["model"]["serve_head"] is None
    assert config["seed"] == 0 and config["eval"]["baselines"] == ["popularity"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
