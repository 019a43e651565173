"""The ablation report: seed intervals and paired deltas (golden values), and a tiny grid run
end to end through `python -m raycg.report` on a real embedded Ray."""
import json
import os

import numpy as np
import pytest

from conftest import tiny_overrides
from raycg.report.summary import claims_table, paired_delta, recall_table, seed_interval, verdict


def _record(variant, seed, conv100, method_values=None):
    ev = {"ks": [100], "methods": ["model", "popularity"], "n_queries": {"conversion": 10},
          "model": {"conversion": {"100": conv100}},
          "popularity": {"conversion": {"100": (method_values or {}).get(seed, 0.1)}}}
    return {"variant": variant, "seed": seed, "eval": ev}


def test_seed_interval_golden():
    mean, lo, hi = seed_interval([0.5, 0.6, 0.7])
    # sd = 0.1, t(0.975, 2) = 4.302653; half = 4.302653 * 0.1 / sqrt(3) = 0.248414
    assert mean == pytest.approx(0.6) and hi - mean == pytest.approx(0.248414, abs=1e-6)
    assert lo == pytest.approx(0.6 - 0.248414, abs=1e-6)
    assert seed_interval([0.5, 0.6, 0.7], bounds=(0.0, 0.8))[2] == 0.8
    assert seed_interval([0.4]) == (0.4, 0.4, 0.4)
    assert seed_interval([0.4, None, float("nan"), 0.4]) == (0.4, 0.4, 0.4)
    assert np.isnan(seed_interval([])[0])


def test_paired_delta_cancels_shared_seed_noise():
    # seeds differ a lot, but a is always exactly 10% above b
    records = [_record("a", s, 1.1 * base) for s, base in enumerate([0.2, 0.5, 0.8])]
    records += [_record("b", s, base) for s, base in enumerate([0.2, 0.5, 0.8])]
    d = paired_delta(records, "a", "b", "conversion", 100)
    assert d["n_seeds"] == 3 and d["rel_mean"] == pytest.approx(0.1)
    assert d["rel_lo"] == pytest.approx(0.1) and d["rel_hi"] == pytest.approx(0.1)
    assert verdict(d) == "a better (interval above 0)"
    # unpaired, the same numbers would overlap completely
    a_int, b_int = seed_interval([r["eval"]["model"]["conversion"]["100"] for r in records[:3]]), \
        seed_interval([r["eval"]["model"]["conversion"]["100"] for r in records[3:]])
    assert a_int[1] < b_int[2]
    table = claims_table(records, [{"a": "a", "b": "b", "task": "conversion", "k": 100, "seed": "a wins"}])
    assert "+10.0% [+10.0%, +10.0%]" in table and "a better" in table
    noisy = records[:3] + [_record("b", s, v) for s, v in enumerate([0.3, 0.4, 0.9])]
    assert verdict(paired_delta(noisy, "a", "b", "conversion", 100)).startswith("no significant")
    assert verdict(paired_delta(records[:1] + records[3:4], "a", "b", "conversion", 100)) == \
        "one seed only: no interval"
    assert verdict(paired_delta(records[:3], "a", "b", "conversion", 100)) == "not run"  # b never ran


def test_a_delta_of_one_seed_has_no_interval_and_of_none_is_not_run():
    from raycg.report.summary import delta_cell

    records = [_record("a", 0, 0.55), _record("b", 0, 0.50), _record("a", 1, 0.66), _record("b", 1, 0.60),
               _record("a", 2, 0.44), _record("b", 2, 0.40), _record("c", 0, 0.25)]
    one = paired_delta(records, "c", "b", "conversion", 100)
    assert one["n_seeds"] == 1 and delta_cell(one) == "-50.0% (1 seed)"
    assert delta_cell(paired_delta(records, "d", "b", "conversion", 100)) == "not run"
    three = paired_delta(records, "a", "b", "conversion", 100)  # +10% in every seed: a zero-width interval
    assert delta_cell(three) == "+10.0% [+10.0%, +10.0%]"
    assert delta_cell(three, seeds=True) == "+10.0% [+10.0%, +10.0%] (3 seeds)"
    table = claims_table(records, [{"a": "c", "b": "b", "task": "conversion", "k": 100, "seed": "c beats b"},
                                   {"a": "d", "b": "b", "task": "conversion", "k": 100, "seed": "d beats b"}])
    assert "| -50.0% (1 seed) | one seed only: no interval |" in table
    assert "| not run | not run |" in table


def test_recall_table_has_variants_then_baselines():
    records = [_record(v, s, 0.5 + 0.01 * s, {0: 0.1, 1: 0.2}) for v in ("ref", "x") for s in (0, 1)]
    table = recall_table(records, ["ref", "x"], "ref", [("conversion", 100)]).splitlines()
    assert table[0] == "| method | conv R@100 |"
    assert table[2].startswith("| two-tower: ref (reference) | 0.5050 [")
    assert table[3].startswith("| two-tower: x | 0.5050 [")
    assert table[4].startswith("| baseline: popularity (global) | 0.1500 [0.0000, ")  # clipped at 0


def test_claims_against_scale_pair_each_grid_of_a_family_by_seed(tmp_path):
    from raycg.report.document import scale_sections
    from raycg.report.grid import Grid

    claim = {"a": "a", "b": "b", "task": "conversion", "k": 100, "seed": "a wins, +20%", "claimed": 0.2}
    # c and d ran at the small scale only: their claim is a demo-only condition, left out
    only_small = {"a": "c", "b": "d", "task": "conversion", "k": 100, "seed": "c wins"}
    # e ran at two scales of three: its claim stays, "not run" where it is missing
    partly = {"a": "a", "b": "e", "task": "conversion", "k": 100, "seed": "a beats e"}

    def grid(name, scale, ratio, extra=()):  # a = ratio x b (and x c, e) at every seed
        names = ["b", *extra]
        records = [_record("a", s, ratio * base) for s, base in enumerate([0.2, 0.5, 0.8])]
        records += [_record(v, s, base) for v in names for s, base in enumerate([0.2, 0.5, 0.8])]
        g = Grid(name=name, title=name, base=[], variants={v: [] for v in ["a", *names]}, reference="a",
                 claims=[claim, only_small, partly], source_csv=None, source_format=None, family="fam", scale=scale)
        return g, records

    lone = Grid(name="other", title="other", base=[], variants={"a": [], "b": []}, reference="a", claims=[claim],
                source_csv=None, source_format=None, family="solo", scale=5)
    body = "\n".join(scale_sections([grid("big", 200_000, 1.05), grid("small", 20_000, 1.10, ["c", "d", "e"]),
                                     grid("mid", 60_000, 1.2, ["e"]),
                                     (lone, grid("x", 5, 1.0)[1])], "links", str(tmp_path)))
    assert "## Claims vs scale: fam" in body and "solo" not in body  # one scale: no section
    row = next(line for line in body.splitlines() if line.startswith("| a wins"))
    # the columns go by scale: 20,000 (+10%) before 200,000 (+5%)
    assert row.index("+10.0% [+10.0%, +10.0%] (3 seeds)") < row.index("+5.0% [+5.0%, +5.0%] (3 seeds)")
    assert "| scale 20,000 | scale 60,000 | scale 200,000 |" in body
    assert "c wins" not in body
    row = next(line for line in body.splitlines() if line.startswith("| a beats e"))
    assert row.endswith("| +10.0% [+10.0%, +10.0%] (3 seeds) | +20.0% [+20.0%, +20.0%] (3 seeds) | not run |")
    with open(tmp_path / "fam_claims_vs_scale.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_ran_on_counts_where_each_record_trained():
    from raycg.report.document import ran_on

    gpu = {"train_device": "NVIDIA H100 80GB HBM3", "cpus": 16, "cpu_model": "AMD EPYC"}
    cpu = {"train_device": "cpu", "cpus": 2, "cpu_model": "Intel Xeon"}
    old_gpu = {"eval": {}, "config": "trainer:\n  use_gpu: true\n"}
    records = [old_gpu, {"eval": {"environment": gpu}}, {"eval": {"environment": cpu}},
               {"eval": {"environment": gpu}}, {"eval": {}, "config": "trainer:\n  use_gpu: false\n"}, old_gpu]
    # records made before runs kept their environment: what their config says, no card guessed
    assert ran_on(records) == ("a GPU, card not recorded: 2 runs; NVIDIA H100 80GB HBM3 (16-core host): 2 runs; "
                               "CPU (2 cores, Intel Xeon): 1 run; CPU, machine not recorded: 1 run")


def test_host_line_names_cores_memory_and_each_kind_of_gpu():
    from raycg.host import host_line

    base = {"cpus": 16, "cpu_model": "AMD EPYC", "memory_gib": 125.8, "system": "Linux 6.8", "python": "3.12.3",
            "torch": "2.11.0", "ray": "2.60.0"}
    assert host_line({**base, "gpus": []}) == ("16 cores (AMD EPYC), 126 GiB RAM, no GPU; Linux 6.8; Python 3.12.3, "
                                               "torch 2.11.0, Ray 2.60.0")
    assert "2 GPUs (NVIDIA H100 80GB HBM3);" in host_line({**base, "gpus": ["NVIDIA H100 80GB HBM3"] * 2})
    assert "2 GPUs (NVIDIA H100, NVIDIA H200);" in host_line({**base, "gpus": ["NVIDIA H100", "NVIDIA H200"]})


def test_host_gpus_come_from_nvidia_smi_and_a_failing_one_means_none_here(tmp_path, monkeypatch):
    from raycg.host import host_gpus

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\n[ \"$1\" = --query-gpu=name ] || exit 2\n"
                   "printf 'NVIDIA H100 80GB HBM3\\nNVIDIA H100 80GB HBM3\\n'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert host_gpus() == ["NVIDIA H100 80GB HBM3"] * 2
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")  # a driver without a GPU
    assert host_gpus() == []  # then torch decides: this CPU build sees none


def test_report_runs_a_tiny_grid_and_resumes(ray_session, tiny_data_dir, tmp_path, capsys):
    from raycg.report.__main__ import main

    # 2 variants x 1 seed, each a real run (1 worker, 1 epoch) on the tiny dataset (seeds in run
    # names and configs: test_shipped_grids_compose)
    base = ", ".join(f'"{o}"' for o in tiny_overrides(tiny_data_dir))
    grid = tmp_path / "tiny.yaml"
    grid.write_text(f"""
name: tiny
title: Tiny grid
base: [{base}, trainer.epochs=1, trainer.num_workers=1, trainer.batch_size=256,
       "eval.ks=[10,100]", "eval.baselines=[popularity,als_engagement]", loss.advertiser_weight=0.3]
reference: ref
variants:
  ref: []
  stacked: [model.cross=stacked]
claims:
  - {{a: ref, b: stacked, task: conversion, k: 100, seed: "parallel beats stacked"}}
""")
    out, doc = tmp_path / "report", tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text("old\n<!-- discussion -->\nOur reading.\n<!-- /discussion -->\nold tail\n")
    main([f"grids=[{grid}]", "seeds=1", f"out={out}", f"publish={doc}"])

    records = json.loads((out / "results.json").read_text())
    assert sorted((r["variant"], r["seed"]) for r in records) == [("ref", 0), ("stacked", 0)]
    for r in records:
        assert r["eval"]["methods"] == ["model", "popularity", "als_engagement"]
        assert 0 <= r["eval"]["model"]["conversion"]["100"] <= 1
    # the variants change the model, not the data: same queries, different recall
    assert records[0]["eval"]["n_queries"] == records[1]["eval"]["n_queries"]
    assert records[0]["eval"]["model"]["engagement"]["10"] != records[1]["eval"]["model"]["engagement"]["10"]
    assert sorted(os.listdir(out / "configs" / "tiny")) == ["ref-s0.yaml", "stacked-s0.yaml"]
    assert "cross: stacked" in (out / "configs" / "tiny" / "stacked-s0.yaml").read_text()
    # report runs keep recall, not a serving export each
    assert (out / "runs" / "tiny" / "ref-s0" / "eval.json").exists()
    assert not (out / "runs" / "tiny" / "ref-s0" / "export").exists()
    for png in ("tiny_recall_at_k.png", "tiny_ablations.png"):
        for folder in (out / "plots", doc.parent / "results" / "plots"):
            assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = doc.read_text()
    assert "Our reading." in text and "old tail" not in text  # hand-written discussion kept
    assert "| two-tower: ref (reference) |" in text and "| baseline: implicit ALS on engagement |" in text
    assert "| parallel beats stacked | ref vs stacked, conv R@100 |" in text
    assert "![tiny_ablations.png](results/plots/tiny_ablations.png)" in text

    # a second invocation reuses both runs
    capsys.readouterr()
    main([f"grids=[{grid}]", "seeds=1", f"out={out}"])
    assert capsys.readouterr().out.count("done earlier, reusing") == 2
    assert "(Ray Train, 1 CPU workers; search: " in text
    # where the runs trained, from each run's own record (this machine's CPU: no GPU here)
    env = records[0]["eval"]["environment"]
    assert env["train_device"] == "cpu" and env["cpus"] == os.cpu_count() and env["train_workers"] == 1
    assert f"Trained on: CPU ({os.cpu_count()} cores, {env['cpu_model']}): 2 runs." in text

    # reuse_only (GPU runs copied back to a CPU machine): seed 1 is reported as not run, never trained
    main([f"grids=[{grid}]", "seeds=2", f"out={out}", "reuse_only=true"])
    assert capsys.readouterr().out.count("not run (reuse_only") == 2
    assert not (out / "runs" / "tiny" / "ref-s1").exists()
    readme = (out / "README.md").read_text()
    assert "2 of 4 training runs (2 variants x 2 seeds; not run: ref-s1, stacked-s1)" in readme
    assert "| ref vs stacked, conv R@100 |" in readme and "one seed only: no interval" in readme
    # the published records rebuild the report with no run directory (runs from another machine)
    published = doc.parent / "results" / "results.json"
    elsewhere = tmp_path / "elsewhere"
    main([f"grids=[{grid}]", "seeds=1", f"out={elsewhere}", f"records=[{published}]", "reuse_only=true"])
    assert capsys.readouterr().out.count("done earlier on another machine, reusing its record") == 2
    assert not (elsewhere / "runs" / "tiny" / "ref-s0").exists()
    assert "cross: stacked" in (elsewhere / "configs" / "tiny" / "stacked-s0.yaml").read_text()
    rebuilt = json.loads((elsewhere / "results.json").read_text())
    assert [r["eval"] for r in rebuilt] == [r["eval"] for r in records]
    assert "(Ray Train, 1 CPU workers; search: " in (elsewhere / "README.md").read_text()
    # ... but not a record of other overrides: that is another experiment
    main([f"grids=[{grid}]", "seeds=1", f"out={tmp_path / 'other_lr'}", f"records=[{published}]",
          "reuse_only=true", "trainer.lr=0.5"])
    assert capsys.readouterr().out.count("a records file has this run with other overrides") == 2
    # nor a finished run directory of other overrides (a grid edited since it ran)
    main([f"grids=[{grid}]", "seeds=1", f"out={out}", "reuse_only=true", "trainer.lr=0.5"])
    printed = capsys.readouterr().out
    assert printed.count("finished with other overrides") == 2 and printed.count("not run (reuse_only") == 2
    assert (out / "runs" / "tiny" / "ref-s0" / "eval.json").exists()  # reuse_only deletes nothing
    # a spent time budget starts no run: seed 1 is left for the next piece, seed 0 is reused
    main([f"grids=[{grid}]", "seeds=2", f"out={out}", "max_minutes=1e-9"])
    printed = capsys.readouterr().out
    assert printed.count("not run (max_minutes") == 2 and printed.count("done earlier, reusing") == 2
    assert not (out / "runs" / "tiny" / "ref-s1").exists()
    with pytest.raises(SystemExit, match="max_minutes=0.0: expected a positive"):
        main([f"grids=[{grid}]", "max_minutes=0"])
    with pytest.raises(SystemExit, match="records file .*nope.json does not exist"):
        main([f"grids=[{grid}]", f"records=[{tmp_path / 'nope.json'}]"])
    (tmp_path / "old.json").write_text(json.dumps([{k: v for k, v in records[0].items() if k != "config"}]))
    with pytest.raises(SystemExit, match=r"record 0 lacks \['config'\]"):
        main([f"grids=[{grid}]", f"records=[{tmp_path / 'old.json'}]"])
    # a part of a grid: only the named variants (and the reference), with the claims between them
    main([f"grids=[{grid}]", "seeds=1", f"out={out}", "variants=[ref]"])
    assert "| ref vs stacked" not in (out / "README.md").read_text()
    assert "1 variant x 1 seed = 1 training run" in (out / "README.md").read_text()
    with pytest.raises(SystemExit, match=r"\['nope'\] in none of the grids \['tiny'\]"):
        main([f"grids=[{grid}]", "variants=[nope]"])
    # a grid whose reference never ran is skipped by name, not reported without its reference
    other = tmp_path / "other.yaml"
    other.write_text(grid.read_text().replace("reference: ref", "reference: mlp").replace(
        "  ref: []", "  ref: []\n  mlp: [model.cross=mlp_only]"))
    main([f"grids=[{other}]", "seeds=1", f"out={out}", "reuse_only=true"])
    assert "tiny: no finished run of the reference mlp; skipping this grid" in capsys.readouterr().out
    assert "**Skipped grids:** tiny (no finished run of the reference mlp)" in (out / "README.md").read_text()


def test_report_arguments_are_checked():
    from hydra.errors import ConfigCompositionException, OverrideParseException

    from raycg.report.__main__ import main, run_overrides_given

    with pytest.raises(SystemExit, match="no .*nope.yaml"):
        main(["grids=[nope]"])
    with pytest.raises(SystemExit, match="positive number of seeds"):
        main(["seeds=0"])
    with pytest.raises(OverrideParseException, match="stacked"):
        main(["stacked"])
    # run overrides are checked when the report starts, not after an hour of runs
    with pytest.raises(ConfigCompositionException, match="model.cross=stakced"):
        main(["grids=[sim]", "model.cross=stakced"])
    assert run_overrides_given(["grids=[sim]", "seeds=1", "trainer.epochs=1", "out=x", "publish=y.md",
                                "model.cross=stacked"]) == ["trainer.epochs=1", "model.cross=stacked"]


def test_shipped_grids_compose():
    """Every variant of every grid in conf/report/ is a valid `python -m raycg.train` config."""
    from raycg.report.grid import CONF_DIR, Grid, compose_run, run_overrides

    names = sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, "report")) if f.endswith(".yaml"))
    assert {"sim", "tmall"} <= set(names)
    for name in names:
        grid = Grid.load(name)
        # an ablation grid has variants; a quality-bar grid (real_*) the default configuration only
        assert len(grid.variants) >= (1 if name.startswith("real_") else 2) and grid.title
        for variant in grid.variants:
            cfg = compose_run(run_overrides(grid, variant, 1, "/tmp/runs", ["data.dir=/tmp/d"]))
            assert cfg.seed == 1 and cfg.run_name == f"{variant}-s1" and cfg.export is False
    sim = Grid.load("sim")
    cfgs = {v: compose_run(run_overrides(sim, v, 0, "/tmp/runs", [])) for v in sim.variants}
    assert {c.model.cross for c in cfgs.values()} == {"parallel", "stacked", "cross_only", "mlp_only"}
    assert cfgs["multi_head"].model.heads == "multi_head" and cfgs["multi_head"].loss.advertiser_weight == 0
    assert cfgs["parallel_unified_adv"].loss.advertiser_weight > 0
    assert cfgs["conversion_only"].loss.engagement_weight == 0 and cfgs["engagement_only"].loss.conversion_weight == 0
    assert not cfgs["no_logq"].loss.log_q_correction and not cfgs["no_duration_weighting"].loss.duration_weighting
