"""Typed configs (raycg.config.schema): typos and bad values fail when Hydra composes the
config, every YAML composes against its schema, and each default lives in one place only
(the YAML): the schemas hold none and the code reads every key directly. No Ray."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import typing

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import MISSING, OmegaConf

from raycg.config import CONF_DIR, ConfigError, compose, require_complete
from raycg.config import schema

# the required keys a group leaves to the command line, and a value for them
REQUIRED = {"files": ["data.dir=/data/logs"]}
GROUPS = ("data", "model", "loss", "trainer", "eval", "experiment", "logger")


def _options(group: str) -> list[str]:
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, group)) if f.endswith(".yaml"))


def _cause(e: BaseException) -> str:
    """Hydra's message with the OmegaConf error it wraps (what the command line prints)."""
    return f"{e}\n{e.__cause__}"


def test_a_typo_in_a_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["model.cros=stacked"])
    assert "Could not override 'model.cros'" in _cause(e.value)
    assert "Key 'cros' not in 'ModelConfig'" in _cause(e.value)


@pytest.mark.parametrize("override,message", [
    ("trainer.precision=fp16", "Invalid value 'fp16', expected one of [auto, fp32, bf16]"),
    ("model.cross=stakced", "Invalid value 'stakced', expected one of [parallel, stacked, cross_only, mlp_only]"),
    ("model.heads=two_heads", "Invalid value 'two_heads', expected one of [unified, multi_head]"),
    ("model.serve_head=clicks", "Invalid value 'clicks'"),
    ("trainer.ingest=procs", "Invalid value 'procs', expected one of [thread, process]"),
    ("trainer.lr_schedule.decay=step", "Invalid value 'step', expected one of [constant, cosine, linear]"),
    ("trainer.table_optimizer=sgd", "Invalid value 'sgd', expected one of [sparse_adam, adagrad]"),
    ("trainer.grad_sync=nccl", "Invalid value 'nccl', expected one of [ddp, allreduce]"),
    ("trainer.compile_mode=fast", "Invalid value 'fast'"),
    ("data.on_bad_rows=skip", "Invalid value 'skip', expected one of [fail, quarantine]"),
    ("eval.device=gpu", "Invalid value 'gpu', expected one of [auto, cpu, cuda]"),
    ("eval.cold_items=maybe", "Invalid value 'maybe', expected one of [auto, keep, drop]"),
    ("eval.baselines=[popularity,popularty]", "Invalid value 'popularty'"),
    ("trainer.epochs=two", "Value 'two' of type 'str' could not be converted to Integer"),
    ("model.vocab.min_count=1.5", "could not be converted to Integer"),
])
def test_a_bad_value_fails_at_composition(override, message):
    with pytest.raises(ConfigCompositionException) as e:
        compose([override])
    assert f"Error merging override {override}" in str(e.value)
    assert message in _cause(e.value)


def test_good_values_compose_and_read_as_plain_strings():
    cfg = compose(["trainer.compile_mode=reduce-overhead", "trainer.precision=bf16", "model.cross=stacked",
                   "eval.baselines=[popularity]", "loss.duration_weighting=false"])
    assert cfg.trainer.compile_mode == "reduce-overhead" and f"{cfg.trainer.precision}" == "bf16"
    assert {"stacked": 1}[cfg.model.cross] == 1 and cfg.loss.duration_weighting is False
    # what the workers, meta.json and config.yaml get: the same values as plain strings
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert json.loads(json.dumps(plain)) == plain and pickle.loads(pickle.dumps(plain)) == plain
    assert "cross: stacked" in OmegaConf.to_yaml(cfg) and "compile_mode: reduce-overhead" in OmegaConf.to_yaml(cfg)
    assert OmegaConf.create(plain).model.cross == "stacked"


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes_against_the_schema(group):
    options = _options(group)
    assert options
    for option in options:
        cfg = compose([f"{group}={option}", *REQUIRED.get(option, [])])
        require_complete(cfg)  # every key of the schema has a value
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_the_conf_tree_has_no_group_these_tests_skip():
    """A new folder of YAMLs must be composed by a test here (or by its own loader's test)."""
    covered = {*GROUPS, "tune", "common", "report", "convert"}
    dirs = {d for d in os.listdir(CONF_DIR) if os.path.isdir(os.path.join(CONF_DIR, d))}
    assert dirs == covered
    apps = sorted(f[:-5] for f in os.listdir(CONF_DIR) if f.endswith(".yaml"))
    assert set(apps) <= {"config", "sweep", "report", "evaluate", "export", "simulate", "convert", "retrieve"}


def test_tune_options_compose_against_the_sweep_schema():
    for option in _options("tune"):
        cfg = compose([f"tune={option}"], config_name="sweep")
        require_complete(cfg)
        assert cfg.tune.mode in ("max", "min") and cfg.trainer.epochs >= 1  # the run config and the sweep's
    with pytest.raises(ConfigCompositionException) as e:
        compose(["tune.mode=maximum"], config_name="sweep")
    assert "Invalid value 'maximum', expected one of [max, min]" in _cause(e.value)


def test_report_grids_and_convert_presets_load_against_their_schemas(tmp_path):
    from raycg.data.logmap import load_mapping
    from raycg.report.grid import Grid

    for name in _options("report"):
        grid = Grid.load(name)
        assert grid.reference in grid.variants
    for name in _options("convert"):
        assert load_mapping(name)["name"] == name
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntitle: t\nbase: []\nvariants: {a: []}\nrefrence: a\n")  # a typo
    with pytest.raises(Exception, match="refrence"):
        Grid.load(str(bad))


def _all_schemas():
    found = set()
    for cls in [*schema.SCHEMAS.values()]:
        stack = [cls]
        while stack:
            c = stack.pop()
            if c in found:
                continue
            found.add(c)
            hints = typing.get_type_hints(c)
            for t in hints.values():
                for arg in (t, *getattr(t, "__args__", ())):
                    if dataclasses.is_dataclass(arg):
                        stack.append(arg)
    return found


def test_the_schemas_hold_no_defaults():
    """One place per default: the YAML. A value default in a schema would be a second one."""
    classes = _all_schemas()
    assert {schema.RunConfig, schema.ModelConfig, schema.LossConfig, schema.TrainerConfig, schema.EvalConfig,
            schema.DataConfig, schema.SimConfigSchema, schema.TuneConfig, schema.ConvertConfig} <= classes
    with_default = [f"{c.__name__}.{f.name}" for c in classes for f in dataclasses.fields(c)
                    if f.default is not MISSING or f.default_factory is not dataclasses.MISSING]
    assert with_default == []


def test_a_key_left_out_of_a_yaml_is_an_error_not_a_default(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from raycg.train.preflight import check_config

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    loss = conf / "loss" / "unified.yaml"
    loss.write_text("".join(line for line in loss.read_text().splitlines(keepends=True)
                            if not line.startswith("freq_alpha:")))
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = hydra_compose(config_name="config")
    with pytest.raises(ConfigError, match=r"missing required setting\(s\): loss.freq_alpha"):
        check_config(cfg)  # the first thing a run does, before Ray starts
    with pytest.raises(ConfigError, match=r"missing required setting\(s\): data.dir"):
        require_complete(compose(["data=files"]))


def test_the_issue_s_disagreeing_defaults_now_have_one_value():
    """log_q_correction, freq_alpha, cross_worker_negatives: the YAML's values, and code given a
    loss config without them fails instead of picking its own."""
    import torch

    from raycg.losses.objective import training_loss
    from raycg.train.step import StepContext

    cfg = compose([])
    assert cfg.loss.log_q_correction is True and cfg.loss.freq_alpha == 0.005
    assert cfg.loss.cross_worker_negatives is True
    loss = OmegaConf.to_container(cfg.loss, resolve=True)
    assert StepContext(loss, freq_buckets=10).freq.alpha == 0.005
    for key in ("log_q_correction", "freq_alpha", "mixed_negatives"):
        with pytest.raises(KeyError, match=key):
            StepContext({k: v for k, v in loss.items() if k != key}, freq_buckets=10)
    signals = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    batch = {"signals": signals, "item_cat": torch.tensor([[1, 2]])}
    emb = {"unified": torch.nn.functional.normalize(torch.ones(1, 4), dim=-1)}
    for key in ("cross_worker_negatives", "advertiser_weight", "duration_weighting"):
        partial = {k: v for k, v in loss.items() if k != key}
        if key != "duration_weighting":
            partial["duration_weighting"] = True  # "auto" is resolved by the driver
        with pytest.raises(KeyError, match=key):
            training_loss(emb, emb, batch, partial, 1.0)


def test_a_model_config_without_a_key_is_an_error():
    from raycg.data.spec import FeatureSpec
    from raycg.model.two_tower import TwoTowerModel

    model = OmegaConf.to_container(compose(["model.vocab.enabled=false"]).model, resolve=True)
    model["buckets"] = {k: 11 for k in model["buckets"]}
    spec = FeatureSpec(user_dense=2, item_dense=3, history_length=2)
    TwoTowerModel(model, spec)
    for key in ("num_experts", "embedding_dropout", "cross_dropout", "heads", "serve_head", "learn_temperature", "item_bias", "sparse_tables"):
        with pytest.raises(KeyError, match=key):
            TwoTowerModel({k: v for k, v in model.items() if k != key}, spec)


def test_sim_schema_is_every_simconfig_knob():
    """data.sim is typed by SimConfigSchema; it must name exactly SimConfig's fields, with their types."""
    from raycg.data.simulate import SimConfig

    ours = {f.name: f.type for f in dataclasses.fields(schema.SimConfigSchema)}
    theirs = {f.name: f.type for f in dataclasses.fields(SimConfig)}
    assert list(ours) == list(theirs)
    as_text = {"List[float]": "list"}
    assert {k: as_text.get(v, v) for k, v in ours.items()} == theirs
    cfg = compose(["data.sim.click_bias=-4.0"])
    sim = SimConfig(**OmegaConf.to_container(cfg.data.sim, resolve=True))
    assert sim.click_bias == -4.0 and sim.n_users == 20000


def test_enumerations_match_the_code_that_reads_them():
    from raycg.eval.evaluate import DEVICES
    from raycg.eval.retrievers import BASELINES
    from raycg.model.towers import HEAD_SETS, STRUCTURES
    from raycg.train.optim import GRAD_SYNCS, TABLE_OPTIMIZERS
    from raycg.train.schedule import DECAYS
    from raycg.train.step import PRECISIONS

    def values(enum):
        return [m.value for m in enum]

    assert values(schema.Cross) == list(STRUCTURES)
    assert values(schema.Heads) == list(HEAD_SETS)
    assert set(values(schema.ServeHead)) == {h for heads in HEAD_SETS.values() for h in heads}
    assert values(schema.Precision) == ["auto", *PRECISIONS]  # auto: resolve_precision
    assert values(schema.Decay) == list(DECAYS)
    assert values(schema.TableOptimizer) == list(TABLE_OPTIMIZERS)
    assert values(schema.GradSync) == list(GRAD_SYNCS)
    assert values(schema.EvalDevice) == list(DEVICES)
    assert values(schema.Baseline) == list(BASELINES)
