"""What a raycg checkpoint holds, how it is verified, and loading a model back from one.

    <checkpoint dir>/model.pt        {"model": state_dict, "optimizer": ..., "epoch": int,
                                      "scheduler": LR schedule state, "step": int,
                                      "freq": logQ estimator state or None, "gen": generator state}
    <checkpoint dir>/meta.json       {"config": full run config, "feature_spec": FeatureSpec dict}
    <checkpoint dir>/checksums.json  {"model.pt": sha256, "meta.json": sha256}, written last

Every load verifies the checksums first, so a damaged file (flipped bytes, a truncated
copy) is an error that names the file instead of a silently different model; a checkpoint
written before checksums existed loads with a warning. `newest_intact` finds the newest
checkpoint of a run that verifies: resuming (raycg.train.loop) and evaluating a run dir
(raycg.evaluate, raycg.export) fall back to it, saying which checkpoint was skipped and why.
"""
from __future__ import annotations

import copy
import glob
import json
import os

import torch

from raycg.checksums import DamagedFileError, verify_checksums, write_checksums
from raycg.data.spec import FeatureSpec
from raycg.logs import get_logger
from raycg.model.two_tower import TwoTowerModel

CHECKPOINT_FILES = ["model.pt", "meta.json"]

# Keys that a run config saved before every key was required (raycg.config.schema) may lack,
# with the value the code that wrote it used for an absent key. Only configs read back from a
# checkpoint get them (`stored_config`); a composed config has every key or fails to start.
LEGACY_KEYS = {
    "seed": 0,
    "model": {"low_rank": None, "num_experts": 1, "embedding_dropout": 0.0, "cross_dropout": 0.0, "sparse_tables": False,
              "learn_temperature": False, "item_bias": "none", "heads": "unified", "serve_head": None,
              "history": {"length": 0, "layers": 1, "heads": 2, "share_item_embedding": False,
                          "match_dim": 0, "match_length": 0, "match_init": 1.0}},
    "data": {"users_path": None, "item_categorical": [], "user_categorical": [], "on_bad_rows": "fail",
             "validation_fraction": 0.0, "check_duplicates": True},
    "eval": {"cold_items": "auto", "device": "auto", "baselines": ["popularity"], "faiss_threads": None, "als": {},
             "ray_inference_min_rows": 0, "actor_gpus": 1, "max_queries": None},  # before in-process embedding of small tables: always Ray Data
    "index": {"exact_max_items": 100_000, "kind": "ivf", "nlist": None, "nprobe": 32, "hnsw_m": 32, "ef_search": 128,
              "recall_k": 100, "recall_queries": 10_000, "batch_size": 4096,
              "new_users": "model", "recent_items": 0, "recent_boost": None},  # exports before the item index
}


class CheckpointError(DamagedFileError):
    """A checkpoint file is missing, damaged or unreadable; names the file."""


def verify(directory: str) -> None:
    try:
        verify_checksums(directory)
    except DamagedFileError as e:
        raise CheckpointError(str(e)) from e


def save(directory: str, model, optimizer, epoch: int, config: dict, spec: dict,
         scheduler=None, step_state: dict | None = None, recent_boost: float | None = None) -> None:
    """`step_state` (raycg.train.step.StepContext.state_dict: global step, logQ estimator,
    generator) resumes the loss state. Tensors are saved from wherever they live (a GPU
    checkpoint loads on a CPU-only machine: `load_state` maps everything to the CPU).
    `recent_boost`: the boost of recent items fitted on this epoch's validation window
    (raycg.model.recent_boost), in meta.json."""
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
         "scheduler": scheduler.state_dict() if scheduler is not None else None, **(step_state or {})},
        os.path.join(directory, "model.pt"),
    )
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({"config": config, "feature_spec": spec, "epoch": epoch, "recent_boost": recent_boost}, f)
    write_checksums(directory, CHECKPOINT_FILES)


def load_state(directory: str) -> dict:
    verify(directory)
    path = os.path.join(directory, "model.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / not a torch file: name it
        raise CheckpointError(f"{path}: cannot load ({type(e).__name__}: {e})") from e


def stored_config(config: dict, legacy: dict = LEGACY_KEYS) -> dict:
    """A run config read from a checkpoint, with the keys an older raycg did not write filled
    in as that version read them (LEGACY_KEYS); keys the config has are kept as they are."""
    out = dict(config)
    for key, value in legacy.items():
        if key not in out:
            out[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and value and isinstance(out[key], dict):
            out[key] = stored_config(out[key], value)
    return out


def load_model(directory: str) -> tuple[TwoTowerModel, dict]:
    """Model in eval mode + the run config it was trained with (`stored_config`)."""
    state = load_state(directory)  # verifies meta.json too
    with open(os.path.join(directory, "meta.json")) as f:
        meta = json.load(f)
    config = stored_config(meta["config"])
    model = TwoTowerModel(config["model"], FeatureSpec.from_dict(meta["feature_spec"]))
    model.load_state_dict(state["model"])
    model.eval()
    return model, config


def recent_boost(directory: str, config: dict) -> tuple[int, float, str]:
    """(N, b, where b came from) of the recent-item boost a checkpoint serves with
    (raycg.model.recent_boost): `index.recent_boost` when the config fixes it, else the value
    fitted on the validation window and saved in meta.json, else 0 (no validation window)."""
    index = stored_config(config)["index"]
    n = int(index["recent_items"])
    if n <= 0:
        return 0, 0.0, "off (index.recent_items=0)"
    if index["recent_boost"] is not None:
        return n, float(index["recent_boost"]), "index.recent_boost"
    with open(os.path.join(directory, "meta.json")) as f:
        fitted = json.load(f).get("recent_boost")
    if fitted is None:
        return n, 0.0, "none fitted (no validation window): the towers alone"
    return n, float(fitted), "fitted on the validation window"


def run_checkpoints(run_dir: str) -> list[str]:
    """The `checkpoint_*` directories of a run, newest first (Ray Train names them by time)."""
    return sorted((d for d in glob.glob(os.path.join(run_dir, "checkpoint_*")) if os.path.isdir(d)), reverse=True)


def newest_intact(run_dir: str, log=get_logger("model").info) -> str:
    """The newest checkpoint of `run_dir` that verifies and loads; each newer damaged one is
    reported through `log`. Raises `CheckpointError` when there is none."""
    found = run_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir}: no checkpoint_* directory (has this run trained an epoch?)")
    problems = []
    for d in found:
        try:
            load_state(d)
        except CheckpointError as e:
            problems.append(str(e))
            log(f"checkpoint {d} is damaged, skipped: {e}")
            continue
        return d
    raise CheckpointError(f"{run_dir}: no intact checkpoint among {len(found)}: " + "; ".join(problems))


def evaluation_checkpoint(run_dir: str, log=get_logger("model").info) -> str:
    """The checkpoint a run is evaluated and exported from: <run>/best (the best validation
    epoch, when the run validated) if it verifies, else the newest intact checkpoint."""
    best = os.path.join(run_dir, "best")
    if os.path.isdir(best):
        try:
            load_state(best)
            return best
        except CheckpointError as e:
            log(f"the best checkpoint is damaged, using the newest intact one instead: {e}")
    return newest_intact(run_dir, log=log)
