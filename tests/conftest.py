"""Shared fixtures: one embedded Ray for the session, small simulated datasets."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray Train's controller polls its workers every 2 s by default (start, every report, the end):
# each fit waited ~4 s of that on the 2-core box (a trivial fit: 13-17 s -> 9-13 s). Tests run
# many short fits; polling every 0.1 s changes nothing else. The preemption watcher (one more
# actor per fit, for cloud spot nodes) has nothing to watch on a local test Ray. Ray's processes
# (and a head node started by a test) inherit these from this process's environment.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# Tests on a real Ray (these fixtures start one) are the `slow` tier: `make test-fast` skips them.
RAY_FIXTURES = {"ray_session", "ray_gpu", "head_node"}


def pytest_collection_modifyitems(config, items):
    """Tiers: tests that run a real Ray get the `slow` marker; `gpu` tests skip cleanly where
    torch sees no CUDA device (CI, the dev machine)."""
    import torch

    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def _ray_for_the_session():
    """Shuts the shared embedded Ray down at the end of the session (see ray_session)."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_session(_ray_for_the_session):
    """A real local Ray (2 CPUs, loopback, dashboard on for Train-under-Tune cleanup).

    Started by the first module that asks for it and kept for the rest of the session (each start
    and stop cost 5-10 s on the 2-core box, once per module before). Ray Train's placement-group
    cleaner and the state API refuse to pick a cluster when several are running on the machine,
    so the test that starts its own head node (test_cluster_job.py, `head_node`) shuts this one
    down first; the next module that needs it starts it again.
    """
    import importlib.util

    import ray

    # the GPU machine's wheel set has no dashboard packages; only the Tune tests need it
    dashboard = importlib.util.find_spec("aiohttp_cors") is not None
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray


def compose(overrides: list[str]):
    """The Hydra config exactly as `python -m raycg.train <overrides>` would see it."""
    from raycg.config import compose as compose_config

    return compose_config(overrides)


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory):
    """The sim_small dataset, simulated once per session."""
    from omegaconf import OmegaConf

    from raycg.data.simulate import SimConfig, write_dataset

    cfg = compose(["data=sim_small"])
    out = str(tmp_path_factory.mktemp("sim_small"))
    write_dataset(SimConfig(**OmegaConf.to_container(cfg.data.sim, resolve=True)), out)
    return out


# A tiny simulated dataset (~48k events, 400 users, 300 items) for tests that check wiring, not
# quality. The data.sim overrides match it, so the driver's ensure_data reuses it instead of
# simulating sim_small into the same directory.
TINY_SIM = {"n_users": 400, "n_items": 300, "n_advertisers": 20, "n_categories": 10, "requests_per_user": 12,
            "num_shards": 2}


def tiny_overrides(data_dir: str) -> list[str]:
    """`python -m raycg.train` overrides for the tiny dataset in `data_dir`."""
    return ["data=sim_small", f"data.dir={data_dir}", *(f"data.sim.{k}={v}" for k, v in TINY_SIM.items())]


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """The tiny dataset, simulated once per session."""
    from omegaconf import OmegaConf

    from raycg.data.simulate import SimConfig, write_dataset

    out = str(tmp_path_factory.mktemp("sim_tiny"))
    cfg = compose(tiny_overrides(out))
    write_dataset(SimConfig(**OmegaConf.to_container(cfg.data.sim, resolve=True)), out)
    return out
