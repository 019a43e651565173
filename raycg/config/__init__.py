"""The one way in: every entry point is a Hydra app on the config tree in `CONF_DIR`.

    CONF_DIR                       the YAML tree (shipped inside the package)
    compose(overrides, name)       a config exactly as `python -m raycg.<app> <overrides>` sees it
    require_complete(cfg)          every `???` value given, or a ConfigError naming the keys
    hydra_app(name)                decorator: task(cfg, overrides) -> main(argv=None)

Importing this module stores the typed schemas (raycg.config.schema) in Hydra's ConfigStore,
where the YAMLs name them (`defaults: [config_schema, ...]`).
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Iterable

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from raycg.config.schema import SCHEMAS

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")  # raycg/conf

for _name, _node in SCHEMAS.items():
    ConfigStore.instance().store(name=_name, node=_node)


class ConfigError(ValueError):
    """A composed config that cannot run (a required `???` value not given, a value out of
    range: raycg.train.preflight); names the keys. The command line prints it without a traceback."""


def compose(overrides: Iterable[str] = (), config_name: str = "config") -> DictConfig:
    """The config `config_name` (raycg/conf/<name>.yaml) with Hydra command-line overrides, exactly
    as the app sees it. Inside a running Hydra app of this tree (raycg.report composing its
    runs) the app's Hydra instance composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def require_complete(cfg: DictConfig) -> None:
    """Every value is given: a `???` left (a required key such as `run_dir`, or a key a YAML
    leaves out: the schemas have no defaults) is an error that names it."""
    missing = missing_keys(cfg)
    if missing:
        raise ConfigError("missing required setting(s): " + ", ".join(missing)
                          + "; give them on the command line, e.g. " + " ".join(f"{k}=..." for k in missing))


def missing_keys(cfg: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """Dotted keys whose value is `???`, without resolving interpolations (OmegaConf's own
    `missing_keys` fails on `${data.dir}/events` when data.dir is the missing one)."""
    keys = cfg.keys() if isinstance(cfg, DictConfig) else range(len(cfg))
    out = []
    for key in keys:
        name = f"{prefix}{key}" if isinstance(cfg, DictConfig) else f"{prefix.rstrip('.')}[{key}]"
        if OmegaConf.is_missing(cfg, key):
            out.append(name)
        elif not OmegaConf.is_interpolation(cfg, key) and isinstance(cfg[key], (DictConfig, ListConfig)):
            out += missing_keys(cfg[key], name + ".")
    return out


def hydra_app(config_name: str) -> Callable:
    """`task(cfg, overrides)` -> `main(argv=None)`. `main()` is the command line through
    `hydra.main` (Hydra's parser, `--help`, `--cfg job`, its error messages); `main([...])`
    composes the same config from a list of overrides (tests, other Python code). `overrides`
    are the command-line overrides as given; a non-zero int returned is the exit status."""

    def wrap(task: Callable[[DictConfig, list[str]], object]) -> Callable:
        def run_cli(cfg: DictConfig) -> None:
            from hydra.core.hydra_config import HydraConfig

            try:
                status = task(cfg, list(HydraConfig.get().overrides.task))
            except ConfigError as e:  # a value missing or out of range: the message, no traceback
                sys.exit(f"error: {e}")
            if isinstance(status, int) and not isinstance(status, bool) and status:
                sys.exit(status)

        cli = hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")(run_cli)

        @functools.wraps(task)
        def main(argv: list[str] | None = None):
            if argv is None:
                return cli()
            argv = list(argv)
            return task(compose(argv, config_name), argv)

        return main

    return wrap
