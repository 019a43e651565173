"""Typed schemas of every config in raycg/conf/ (Hydra structured configs).

The YAML files hold every value and document it; these dataclasses hold the types, the
allowed values of every enumeration and the set of keys, and nothing else: no field has a
default (each is `MISSING`), so there is exactly one place per default (the YAML), and a
YAML that leaves a key out composes to a config with a missing value, which
`raycg.config.require_complete` turns into an error naming the key. Hydra validates every
override against these types when it composes the config, before anything runs:

    model.cros=stacked        Could not override 'model.cros'. ... Key 'cros' is not in struct
    model.cross=stakced       Invalid value 'stakced', expected one of [parallel, stacked, ...]
    trainer.precision=fp16    Invalid value 'fp16', expected one of [auto, fp32, bf16]
    trainer.epochs=two        Value 'two' of type 'str' could not be converted to Integer

Enumerations are `StrEnum`s whose member names are their values: a composed config holds
members that compare, hash, format and JSON-encode as the plain strings (`"stacked"`).
`raycg.config` stores these schemas in Hydra's ConfigStore; this module imports nothing from
raycg.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


def _choices(name: str, *values: str) -> type[StrEnum]:
    """A StrEnum whose members are named by their values (`reduce-overhead` included): Hydra
    accepts an override by member name, so the name is what a user types."""
    return StrEnum(name, [(v, v) for v in values], module=__name__, qualname=name)


# -- enumerations (raycg/conf/*.yaml comments list them too) -----------------------------------
DataSource = _choices("DataSource", "simulator", "files")
OnBadRows = _choices("OnBadRows", "fail", "quarantine")
Shuffle = _choices("Shuffle", "none", "once", "epoch")
Cross = _choices("Cross", "parallel", "stacked", "cross_only", "mlp_only")  # raycg.model.towers.STRUCTURES
Heads = _choices("Heads", "unified", "multi_head")  # raycg.model.towers.HEAD_SETS
ItemBias = _choices("ItemBias", "none", "learned", "prior")  # raycg.model.two_tower.ITEM_BIASES
ServeHead = _choices("ServeHead", "unified", "engagement", "conversion")
Precision = _choices("Precision", "auto", "fp32", "bf16")  # raycg.train.step.PRECISIONS
Decay = _choices("Decay", "constant", "cosine", "linear")  # raycg.train.schedule.DECAYS
TableOptimizer = _choices("TableOptimizer", "sparse_adam", "adagrad")  # raycg.train.optim.TABLE_OPTIMIZERS
CompileMode = _choices("CompileMode", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
Ingest = _choices("Ingest", "thread", "process")
GradSync = _choices("GradSync", "ddp", "allreduce")  # raycg.train.optim.GRAD_SYNCS
EvalDevice = _choices("EvalDevice", "auto", "cpu", "cuda")  # raycg.eval.evaluate.DEVICES
ColdItems = _choices("ColdItems", "auto", "keep", "drop")
Baseline = _choices("Baseline", "popularity", "popularity_surface", "recent_engaged", "als_engagement",
                    "als_conversion")  # raycg.eval.evaluate.BASELINES
TuneMode = _choices("TuneMode", "max", "min")
TuneSearcher = _choices("TuneSearcher", "optuna", "random")  # raycg.tune.sweep.make_searcher
TuneScheduler = _choices("TuneScheduler", "asha", "fifo")  # raycg.tune.sweep.make_scheduler
IndexKind = _choices("IndexKind", "ivf", "hnsw")  # raycg.retrieve.index.KINDS
NewUsers = _choices("NewUsers", "model", "popularity")  # raycg.retrieve.index.NEW_USERS
LoggerKind = _choices("LoggerKind", "none", "mlflow", "tensorboard")  # raycg.train.tracking.TRACKERS
LogLevel = _choices("LogLevel", "DEBUG", "INFO", "WARNING", "ERROR")  # raycg.logs.LEVELS


# -- data (raycg/conf/data/*.yaml) -------------------------------------------------------------
@dataclass
class SimConfigSchema:
    """data.sim: every knob of raycg.data.simulate.SimConfig (tests/test_config.py keeps the two
    in step); raycg/conf/data/sim_default.yaml gives each a value."""

    seed: int = MISSING
    n_users: int = MISSING
    n_items: int = MISSING
    n_advertisers: int = MISSING
    n_categories: int = MISSING
    latent_dim: int = MISSING
    content_dim: int = MISSING
    days: int = MISSING
    eval_days: int = MISSING
    requests_per_user: float = MISSING
    impressions_per_request: int = MISSING
    num_shards: int = MISSING
    surface_probs: List[float] = MISSING
    relevant_candidate_frac: float = MISSING
    item_spread: float = MISSING
    content_noise: float = MISSING
    click_bias: float = MISSING
    clickbait_frac: float = MISSING
    clickbait_click_bonus: float = MISSING
    genuine_duration_s: float = MISSING
    accidental_duration_s: float = MISSING
    save_rate: float = MISSING
    conversion_bias: float = MISSING
    advertiser_propensity_std: float = MISSING
    cross_strength: float = MISSING
    order3_strength: float = MISSING
    complement_strength: float = MISSING
    complement_candidate_frac: float = MISSING
    query_advertiser_strength: float = MISSING
    user_advertiser_strength: float = MISSING
    user_taste_groups: int = MISSING
    popularity_sigma: float = MISSING
    activity_sigma: float = MISSING
    conversion_delay_mean_s: float = MISSING
    parallel_min_impressions: int = MISSING
    users_per_block: int = MISSING


@dataclass
class DataConfig:
    source: DataSource = MISSING
    dir: str = MISSING
    train_path: str = MISSING
    eval_path: str = MISSING
    items_path: str = MISSING
    users_path: Optional[str] = MISSING
    item_categorical: List[str] = MISSING
    user_categorical: List[str] = MISSING
    materialize: bool = MISSING
    pack_batch_size: int = MISSING
    shuffle: Shuffle = MISSING
    on_bad_rows: OnBadRows = MISSING
    validation_fraction: float = MISSING
    max_quarantined_fraction: float = MISSING
    check_duplicates: bool = MISSING
    sim: Optional[SimConfigSchema] = MISSING  # null for data=files


# -- model (raycg/conf/model/*.yaml) -----------------------------------------------------------
@dataclass
class VocabConfig:
    enabled: bool = MISSING
    min_count: int = MISSING
    max_size: Optional[int] = MISSING
    oov_buckets: int = MISSING
    oov_dropout: float = MISSING


@dataclass
class HistoryConfig:
    length: int = MISSING
    layers: int = MISSING
    heads: int = MISSING
    share_item_embedding: bool = MISSING
    match_dim: int = MISSING
    match_length: int = MISSING
    match_init: float = MISSING


@dataclass
class ModelConfig:
    cross: Cross = MISSING
    cross_layers: int = MISSING
    low_rank: Optional[int] = MISSING
    num_experts: int = MISSING
    mlp_dims: List[int] = MISSING
    head_dims: List[int] = MISSING
    embedding_dim: int = MISSING
    id_dim: int = MISSING
    embedding_dropout: float = MISSING
    cross_dropout: float = MISSING
    temperature: float = MISSING
    learn_temperature: bool = MISSING
    item_bias: ItemBias = MISSING
    sparse_tables: bool = MISSING
    vocab: VocabConfig = MISSING
    max_buckets: int = MISSING
    # null = sized from the data; the driver adds one entry per extra categorical column
    buckets: Dict[str, Optional[int]] = MISSING
    heads: Heads = MISSING
    serve_head: Optional[ServeHead] = MISSING
    history: HistoryConfig = MISSING
    # (the driver adds `vocab_sizes`, {feature: vocabulary size}, with model.vocab.enabled)


# -- loss (raycg/conf/loss/*.yaml) -------------------------------------------------------------
@dataclass
class LossConfig:
    conversion_weight: float = MISSING
    engagement_weight: float = MISSING
    # auto | true | false (a bool or the string auto: raycg.train.preflight checks it before Ray starts)
    duration_weighting: Any = MISSING
    t_max: float = MISSING
    mask_accidental_hits: bool = MISSING
    log_q_correction: bool = MISSING
    freq_alpha: float = MISSING
    cross_worker_negatives: bool = MISSING
    mixed_negatives: int = MISSING
    hard_negatives: int = MISSING
    advertiser_weight: float = MISSING
    advertiser_block_rows: Optional[int] = MISSING


# -- trainer (raycg/conf/trainer/*.yaml) -------------------------------------------------------
@dataclass
class LrScheduleConfig:
    decay: Decay = MISSING
    warmup_steps: int = MISSING
    min_lr_ratio: float = MISSING
    total_steps: Optional[int] = MISSING


@dataclass
class EarlyStoppingConfig:
    metric: str = MISSING  # val_mean_recall | val_<conversion|engagement>_recall@<K>: checked by the driver
    patience: int = MISSING
    min_delta: float = MISSING
    max_queries: int = MISSING  # per task: a seeded sample of the validation window's queries


@dataclass
class TrainerConfig:
    num_workers: int = MISSING
    cpus_per_worker: float = MISSING
    use_gpu: bool = MISSING
    gpus_per_worker: float = MISSING  # with use_gpu: a fraction lets Tune trials share a GPU
    epochs: Optional[int] = MISSING  # null = auto (raycg.train.driver.fit_epochs)
    min_steps: int = MISSING
    batch_size: int = MISSING
    min_steps_per_epoch: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    table_optimizer: TableOptimizer = MISSING
    table_lr: Optional[float] = MISSING
    lr_schedule: LrScheduleConfig = MISSING
    grad_clip_norm: Optional[float] = MISSING
    precision: Precision = MISSING
    tf32: bool = MISSING
    compile: bool = MISSING
    compile_mode: Optional[CompileMode] = MISSING
    ingest: Ingest = MISSING
    transfer_batches: int = MISSING
    prefetch_batches: int = MISSING
    max_failures: int = MISSING
    startup_retries: int = MISSING
    resources_wait_s: float = MISSING
    grad_sync: GradSync = MISSING
    deterministic: bool = MISSING
    early_stopping: EarlyStoppingConfig = MISSING
    checkpoints_to_keep: int = MISSING
    log_every_steps: int = MISSING
    profile_steps: int = MISSING


# -- eval (raycg/conf/eval/*.yaml) -------------------------------------------------------------
@dataclass
class AlsConfig:
    factors: int = MISSING
    iterations: int = MISSING
    regularization: float = MISSING
    alpha: float = MISSING


@dataclass
class EvalConfig:
    ks: List[int] = MISSING
    cold_items: ColdItems = MISSING
    query_batch_size: int = MISSING
    inference_batch_size: int = MISSING
    ray_inference_min_rows: int = MISSING
    faiss_threads: Optional[int] = MISSING
    device: EvalDevice = MISSING
    actor_gpus: float = MISSING  # GPUs of each Ray Data embedding actor on a GPU cluster
    baselines: List[Baseline] = MISSING
    als: AlsConfig = MISSING
    max_queries: Optional[int] = MISSING  # per task, a seeded uniform sample; null: every query


# -- the run config (raycg/conf/config.yaml: python -m raycg.train) ----------------------------
@dataclass
class PathsConfig:
    runs_dir: str = MISSING


@dataclass
class LoggerConfig:
    """Experiment tracking (raycg/conf/logger/*.yaml, raycg/train/tracking.py)."""
    kind: LoggerKind = MISSING
    tracking_uri: Optional[str] = MISSING  # mlflow; null: sqlite:///<run>/mlflow.db
    experiment: str = MISSING  # mlflow experiment name
    dir: Optional[str] = MISSING  # tensorboard event files; null: <run>/tensorboard


@dataclass
class RayConfig:
    address: Optional[str] = MISSING
    num_cpus: Optional[int] = MISSING
    include_dashboard: Optional[bool] = MISSING


@dataclass
class IndexConfig:
    """The item index written to <run>/export/ after training (raycg/retrieve/index.py)."""

    exact_max_items: int = MISSING
    kind: IndexKind = MISSING
    nlist: Optional[int] = MISSING
    nprobe: int = MISSING
    hnsw_m: int = MISSING
    ef_search: int = MISSING
    recall_k: int = MISSING
    recall_queries: int = MISSING
    batch_size: int = MISSING
    new_users: NewUsers = MISSING
    recent_items: int = MISSING
    recent_boost: Optional[float] = MISSING


@dataclass
class RunConfig:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    loss: LossConfig = MISSING
    trainer: TrainerConfig = MISSING
    eval: EvalConfig = MISSING
    seed: int = MISSING
    run_name: Optional[str] = MISSING
    paths: PathsConfig = MISSING
    ray: RayConfig = MISSING
    index: IndexConfig = MISSING
    export: bool = MISSING
    logger: LoggerConfig = MISSING
    log_level: LogLevel = MISSING  # raycg/conf/common/hydra.yaml, shared by every app


# -- tune (raycg/conf/tune/*.yaml; raycg/conf/sweep.yaml = the run config + tune) --------------
@dataclass
class TuneConfig:
    name: Optional[str] = MISSING
    searcher: TuneSearcher = MISSING
    num_samples: int = MISSING
    seed: int = MISSING
    startup_trials: int = MISSING  # optuna: random trials before TPE models the results
    metric: str = MISSING  # <conversion|engagement>_recall@<k in eval.ks>: checked by the sweep
    mode: TuneMode = MISSING
    scheduler: TuneScheduler = MISSING
    scheduler_metric: str = MISSING  # val_mean_recall | val_<task>_recall@<k>: checked by the sweep
    grace_period: int = MISSING
    reduction_factor: float = MISSING
    max_concurrent_trials: int = MISSING
    trial_resources: Dict[str, float] = MISSING
    max_failures: int = MISSING
    search_space: Dict[str, Any] = MISSING  # nested {key: {type, values}}: checked by the sweep


@dataclass
class SweepConfig(RunConfig):
    tune: TuneConfig = MISSING


# -- the other entry points (raycg/conf/<app>.yaml) --------------------------------------------
@dataclass
class ReportConfig(RunConfig):
    """python -m raycg.report: its own keys on top of the run config, so that every other
    override (e.g. trainer.epochs=1) is checked here and then applied to every run."""

    grids: List[str] = MISSING
    seeds: int = MISSING
    out: str = MISSING
    publish: Optional[str] = MISSING
    reuse_only: bool = MISSING
    records: List[str] = MISSING
    variants: List[str] = MISSING
    max_minutes: Optional[float] = MISSING


@dataclass
class EvaluateConfig:
    run_dir: str = MISSING
    eval: EvalConfig = MISSING
    log_level: LogLevel = MISSING


@dataclass
class ExportConfig:
    run_dir: str = MISSING
    out: Optional[str] = MISSING
    log_level: LogLevel = MISSING


@dataclass
class RetrieveRayConfig:
    address: Optional[str] = MISSING
    num_cpus: Optional[int] = MISSING


@dataclass
class RetrieveConfig:
    export_dir: str = MISSING
    k: int = MISSING
    user_id: Optional[int] = MISSING
    surface: str = MISSING  # checked against the export's surfaces by raycg.retrieve.requests
    context_item_id: int = MISSING
    query_id: int = MISSING
    recent_item_ids: List[int] = MISSING
    recent_event_types: List[str] = MISSING
    threads: int = MISSING
    input: Optional[str] = MISSING
    output: Optional[str] = MISSING
    batch_size: int = MISSING
    actors: int = MISSING
    ray: RetrieveRayConfig = MISSING
    log_level: LogLevel = MISSING


@dataclass
class SimulateConfig:
    out: str = MISSING
    parallel: Optional[bool] = MISSING
    num_cpus: Optional[int] = MISSING
    data: DataConfig = MISSING
    log_level: LogLevel = MISSING


@dataclass
class ConvertConfig:
    mapping: str = MISSING
    input: str = MISSING
    out_dir: str = MISSING
    cutoff_ts: Optional[int] = MISSING
    eval_fraction: float = MISSING
    shards: int = MISSING
    session_gap_cap: Optional[float] = MISSING
    content_dim: Optional[int] = MISSING
    seed: int = MISSING
    overwrite: bool = MISSING
    attribution_window_days: float = MISSING
    log_level: LogLevel = MISSING


# -- report grids (raycg/conf/report/*.yaml; loaded by raycg.report.grid, not composed by Hydra) ---
@dataclass
class Claim:
    a: str = MISSING
    b: str = MISSING
    task: str = MISSING
    k: int = MISSING
    seed: str = MISSING  # the seed paper's claim, quoted
    claimed: Optional[float] = None  # its relative change as a number (0.11 for +11%), drawn in the scale plot


@dataclass
class GridConfig:
    name: str = MISSING
    title: str = MISSING
    base: List[str] = MISSING
    variants: Dict[str, List[str]] = MISSING
    reference: str = MISSING
    # Optional keys of a grid file. A grid is an input file (like a raycg.convert mapping), not
    # a composed config group: these three may be left out, meaning none / none / the grid name.
    claims: List[Claim] = field(default_factory=list)
    source_csv: Optional[str] = None  # a real log converted at run time ($VARS expanded)
    source_format: Optional[str] = None  # its raycg.convert mapping; null: the grid name
    # the scale axis: grids of one `family` (the same variants and claims on bigger data) with
    # their `scale` (e.g. the number of users) get a claims-vs-scale table and plot
    family: Optional[str] = None
    scale: Optional[int] = None


# ConfigStore name -> schema (raycg.config stores them; the YAMLs name them in their defaults)
SCHEMAS = {
    "config_schema": RunConfig,
    "sweep_schema": SweepConfig,
    "report_schema": ReportConfig,
    "evaluate_schema": EvaluateConfig,
    "export_schema": ExportConfig,
    "retrieve_schema": RetrieveConfig,
    "simulate_schema": SimulateConfig,
    "convert_schema": ConvertConfig,
}
