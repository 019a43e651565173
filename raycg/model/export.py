"""Export each tower with `torch.export` for serving, with its normalisation statistics.

    <out>/user_tower.pt2      f(user_cat, user_dense, hist_items, hist_actions) -> [B, E] unit vectors
    <out>/item_tower.pt2      f(item_cat, item_dense) -> [B, E]
    <out>/feature_spec.json   format_version, input columns, dense normalisation mean/std,
                              history length, serving head, temperature
    <out>/checksums.json      SHA-256 of every file of the export (raycg.checksums)

Both towers are `torch.export` programs (`torch.export.save`; TorchScript is deprecated) with a
dynamic batch dimension. They take raw ids: the id vocabularies (raycg.data.vocab) and the
dense normalisation statistics are buffers inside them (also written to feature_spec.json
for feature pipelines). Inputs with no columns (e.g. no history) still take a [B, 0]
tensor, so the signature is fixed. `load_towers` refuses an export of another
`format_version` and verifies the checksums first.

    python -m raycg.export run_dir=runs/<name>      # best/latest checkpoint -> runs/<name>/export

raycg.retrieve adds the feature tables, item embeddings and the faiss index to the same
directory (its own files, listed in the same checksums.json).
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from raycg.checksums import DamagedFileError, verify_checksums, write_checksums
from raycg.model.card import example_batch
from raycg.model.two_tower import TwoTowerModel

FORMAT_VERSION = 2  # 1: TorchScript towers (user_tower.pt, item_tower.pt), no format_version field
TOWER_FILES = {"user_tower": "user_tower.pt2", "item_tower": "item_tower.pt2"}
SPEC_FILE = "feature_spec.json"


class ExportError(DamagedFileError):
    """An export directory that cannot be used: a missing or damaged file, or another format."""


class UserTowerForServing(nn.Module):
    def __init__(self, model: TwoTowerModel):
        super().__init__()
        self.model = model

    def forward(self, user_cat, user_dense, hist_items, hist_actions):
        batch = {"user_cat": user_cat, "user_dense": user_dense}
        if self.model.spec.history_length:
            batch.update(hist_items=hist_items, hist_actions=hist_actions)
        return self.model.embed_users(batch)


class ItemTowerForServing(nn.Module):
    def __init__(self, model: TwoTowerModel):
        super().__init__()
        self.model = model

    def forward(self, item_cat, item_dense):
        return self.model.embed_items({"item_cat": item_cat, "item_dense": item_dense})


def user_inputs(batch: dict) -> tuple:
    b = batch["user_cat"].shape[0]
    empty = torch.zeros(b, 0, dtype=torch.long)
    return (batch["user_cat"], batch["user_dense"], batch.get("hist_items", empty), batch.get("hist_actions", empty))


def item_inputs(batch: dict) -> tuple:
    return batch["item_cat"], batch["item_dense"]


def _export(module: nn.Module, args: tuple, path: str) -> None:
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(module, args, dynamic_shapes=tuple({0: batch} for _ in args))
    torch.export.save(program, path)


def export_towers(model: TwoTowerModel, out_dir: str) -> dict[str, str]:
    """Export both towers (eval mode) and write them + feature_spec.json to `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    model = model.eval()
    example = example_batch(model, batch=4)
    paths = {name: os.path.join(out_dir, f) for name, f in TOWER_FILES.items()}
    _export(UserTowerForServing(model), user_inputs(example), paths["user_tower"])
    _export(ItemTowerForServing(model), item_inputs(example), paths["item_tower"])
    with torch.no_grad():
        dim = int(model.embed_items(example).shape[1])
    meta = dict(model.spec.to_dict(), format_version=FORMAT_VERSION, serve_head=model.serve_head,
                temperature=float(model.temperature), embedding_dim=dim)
    paths["feature_spec"] = os.path.join(out_dir, SPEC_FILE)
    with open(paths["feature_spec"], "w") as f:
        json.dump(meta, f, indent=2)
    write_checksums(out_dir, [os.path.basename(p) for p in paths.values()])
    for old in ("user_tower.pt", "item_tower.pt"):  # a format-1 export of the same run
        if os.path.exists(os.path.join(out_dir, old)):
            os.remove(os.path.join(out_dir, old))
    return paths


def read_meta(export_dir: str) -> dict:
    """feature_spec.json of an export, after checking the directory, its checksums and its
    format_version; `ExportError` names what is wrong."""
    if not os.path.isdir(export_dir):
        raise ExportError(f"{export_dir}: no such export directory (python -m raycg.export run_dir=<run> writes one)")
    path = os.path.join(export_dir, SPEC_FILE)
    if not os.path.exists(path):
        raise ExportError(f"{path}: missing; {export_dir} is not a raycg export")
    if not os.path.exists(os.path.join(export_dir, "checksums.json")):
        raise ExportError(f"{export_dir}: checksums.json missing; re-export with python -m raycg.export")
    try:
        verify_checksums(export_dir)
    except DamagedFileError as e:
        raise ExportError(str(e)) from e
    with open(path) as f:
        meta = json.load(f)
    version = meta.get("format_version", 1)
    if version != FORMAT_VERSION:
        raise ExportError(f"{export_dir}: export format_version {version}, this raycg reads format_version "
                          f"{FORMAT_VERSION} ({'TorchScript towers, ' if version == 1 else ''}written by "
                          f"{'an older' if version < FORMAT_VERSION else 'a newer'} raycg); re-export the run "
                          "with this raycg: python -m raycg.export run_dir=<run>")
    return meta


def load_tower(export_dir: str, name: str) -> nn.Module:
    """One tower ("user_tower" or "item_tower") of an export whose meta passed `read_meta`."""
    path = os.path.join(export_dir, TOWER_FILES[name])
    if not os.path.exists(path):
        raise ExportError(f"{path}: missing")
    try:
        return torch.export.load(path).module()
    except Exception as e:
        raise ExportError(f"{path}: cannot load ({type(e).__name__}: {e})") from e


def load_towers(export_dir: str) -> tuple[nn.Module, nn.Module, dict]:
    """(user tower, item tower, feature_spec.json) of a verified export; the towers are
    callables `user(*user_inputs(batch))`, `item(*item_inputs(batch))`."""
    meta = read_meta(export_dir)
    return load_tower(export_dir, "user_tower"), load_tower(export_dir, "item_tower"), meta
