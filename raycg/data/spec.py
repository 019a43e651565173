"""The feature spec: the contract between the data pipeline and the model.

The driver (raycg.train.driver) fills it in from the training split (columns of the feature
store, normalisation statistics from raycg.data.features.dense_moments); the towers are built
from it (raycg.model.two_tower); checkpoints and exports carry it as a dict (`to_dict` /
`from_dict`). It names columns and holds widths and statistics only, so the model imports it
without the Ray Data pipeline.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class FeatureSpec:
    """Column names of the categorical inputs (bucket names) and dense widths + stats."""

    user_cat: list[str] = field(default_factory=lambda: ["user", "surface", "context_item", "query"])
    item_cat: list[str] = field(default_factory=lambda: ["item", "advertiser", "category"])
    user_dense: int = 0
    item_dense: int = 0
    user_dense_mean: list[float] | None = None
    user_dense_std: list[float] | None = None
    item_dense_mean: list[float] | None = None
    item_dense_std: list[float] | None = None
    history_length: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        return cls(**d)
