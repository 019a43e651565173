"""Every tower structure x head design trains and evaluates end to end (tiny data, 1 epoch)."""
import json
import math

import pytest

from conftest import compose
from raycg.model.towers import HEAD_SETS, STRUCTURES
from raycg.train.driver import run


@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory):
    from raycg.data.simulate import SimConfig, write_dataset

    out = str(tmp_path_factory.mktemp("sim_tiny"))
    write_dataset(SimConfig(n_users=400, n_items=300, n_advertisers=20, n_categories=10, requests_per_user=12,
                            num_shards=2), out)
    return out


@pytest.mark.parametrize("heads", list(HEAD_SETS))
@pytest.mark.parametrize("structure", STRUCTURES)
def test_structure_and_heads(ray_session, tiny_data_dir, tmp_path, structure, heads):
    cfg = compose([
        "data=sim_small", f"data.dir={tiny_data_dir}", f"paths.runs_dir={tmp_path}", "run_name=v",
        f"model.cross={structure}", f"model.heads={heads}", "trainer.epochs=1", "trainer.num_workers=1",
        "trainer.batch_size=256", "model.history.length=4", "eval.ks=[10,100]",
    ])
    results = run(cfg)
    metrics = [json.loads(x) for x in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and math.isfinite(metrics[0]["loss"])
    for task in ("conversion", "engagement"):
        assert 0.0 <= results["model"][task][10] <= results["model"][task][100] <= 1.0
    export = tmp_path / "v" / "export"  # the driver's export: towers, item index, its measured recall
    index = json.loads((export / "index.json").read_text())
    assert index["kind"] == "flat" and index["recall"]["n_queries"] > 0 and index["recall"]["value"] == 1.0
    from raycg.retrieve import Retriever

    assert len(Retriever(str(export)).retrieve(user_id=1, surface="home", k=5)[0]) == 5
