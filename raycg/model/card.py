"""Model card: parameter counts per component and forward FLOPs per example, per tower."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from raycg.model.two_tower import TwoTowerModel


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def component_params(model: TwoTowerModel) -> dict[str, int]:
    out = {}
    for tower_name in ("user_tower", "item_tower"):
        tower = getattr(model, tower_name)
        out[f"{tower_name}.embeddings"] = _count(tower.embeddings)
        out[f"{tower_name}.history"] = _count(tower.history)
        out[f"{tower_name}.cross"] = _count(tower.body.cross)
        out[f"{tower_name}.mlp"] = _count(tower.body.mlp)
        for head, module in tower.heads.items():
            out[f"{tower_name}.head.{head}"] = _count(module)
    return out


def example_batch(model: TwoTowerModel, batch: int = 8) -> dict[str, torch.Tensor]:
    """A zero batch with every input the model's FeatureSpec declares."""
    spec = model.spec
    out = {
        "user_cat": torch.zeros(batch, len(spec.user_cat), dtype=torch.long),
        "user_dense": torch.zeros(batch, spec.user_dense),
        "item_cat": torch.zeros(batch, len(spec.item_cat), dtype=torch.long),
        "item_dense": torch.zeros(batch, spec.item_dense),
    }
    if spec.history_length:
        out["hist_items"] = torch.full((batch, spec.history_length), 3, dtype=torch.long)
        out["hist_actions"] = torch.ones(batch, spec.history_length, dtype=torch.long)
    return out


def flops_per_example(model: TwoTowerModel, batch: int = 8) -> dict[str, float]:
    """Forward FLOPs (multiply-add = 2) per example of each tower, all heads."""
    b = example_batch(model, batch)
    out = {}
    with torch.no_grad():
        for name, fn in (("user_tower", lambda: model.user_heads(b)), ("item_tower", lambda: model.item_heads(b))):
            counter = FlopCounterMode(display=False)
            with counter:
                fn()
            out[name] = counter.get_total_flops() / batch
    return out


def model_card(model: TwoTowerModel) -> str:
    params = component_params(model)
    flops = flops_per_example(model)
    lines = ["model card", f"  {'component':<34}{'parameters':>14}"]
    lines += [f"  {name:<34}{n:>14,}" for name, n in params.items()]
    lines.append(f"  {'total':<34}{_count(model):>14,}")
    lines += [f"  forward FLOPs/example {name:<12}{f:>14,.0f}" for name, f in flops.items()]
    return "\n".join(lines)
