"""Model card: parameter counts per component, forward FLOPs per example per tower, and each
id table's rows, bytes and optimizer-state bytes."""
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


# optimizer state per parameter value: Adam and SparseAdam keep two moments, Adagrad one sum
STATE_PER_VALUE = {"adam": 2, "sparse_adam": 2, "adagrad": 1}


def id_tables(model: TwoTowerModel, table_optimizer: str = "adam") -> list[dict]:
    """One row per id table (a table shared by two modules once): name, rows, dim, bytes of the
    fp32 weights and of the optimizer's state (`table_optimizer` for sparse tables, else Adam)."""
    out, seen = [], set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and id(module.weight) not in seen and module.num_embeddings > 64:
            seen.add(id(module.weight))
            opt = table_optimizer if module.sparse else "adam"
            nbytes = module.weight.numel() * module.weight.element_size()
            out.append({"name": name.removesuffix(".emb"), "rows": module.num_embeddings, "dim": module.embedding_dim,
                        "bytes": nbytes, "optimizer": opt, "state_bytes": STATE_PER_VALUE[opt] * nbytes,
                        "sparse": module.sparse})
    return out


def training_bytes(model: TwoTowerModel, table_optimizer: str = "adam") -> int:
    """Bytes one worker holds for the model while training (activations not counted): fp32
    weights, optimizer state and gradients; a sparse table keeps no table-sized gradient."""
    sparse = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse}
    total = 0
    for p in model.parameters():
        b = p.numel() * p.element_size()
        total += b * (1 + STATE_PER_VALUE[table_optimizer]) if id(p) in sparse else b * (1 + 2 + 1)
    return total


def model_card(model: TwoTowerModel, table_optimizer: str = "adam") -> str:
    params = component_params(model)
    flops = flops_per_example(model)
    lines = ["model card", f"  {'component':<34}{'parameters':>14}"]
    lines += [f"  {name:<34}{n:>14,}" for name, n in params.items()]
    lines.append(f"  {'total':<34}{_count(model):>14,}")
    lines += [f"  forward FLOPs/example {name:<12}{f:>14,.0f}" for name, f in flops.items()]
    tables = id_tables(model, table_optimizer)
    if tables:
        lines.append(f"  {'id table (> 64 rows)':<34}{'rows':>12}{'MB':>9}{'optimizer':>13}{'state MB':>10}")
        lines += [f"  {t['name']:<34}{t['rows']:>12,}{t['bytes'] / 2**20:>9.1f}{t['optimizer']:>13}"
                  f"{t['state_bytes'] / 2**20:>10.1f}" for t in tables]
        total = sum(t["bytes"] + t["state_bytes"] for t in tables)
        lines.append(f"  {'tables + optimizer state':<34}{'':>12}{total / 2**20:>9.1f} MB per worker (gradients: "
                     f"{'looked-up rows only' if any(t['sparse'] for t in tables) else 'table-sized'})")
    return "\n".join(lines)
