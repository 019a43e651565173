"""cluster/kuberay-rayjob.yaml and cluster/aws-gpu.yaml, checked offline: no Ray is started and
no cluster is contacted.

- The RayJob: the fields the KubeRay v1 CRD and operator require (apiVersion/kind, entrypoint,
  head and worker group templates with containers, groupName, min/max replicas), GPU limits on
  the GPU group, the shared volume mounted at the same path in every container.
- The launcher config: Ray's own `ray-schema.json`, then the launcher's offline steps of `ray up`
  (prepare_config + validate_config), and the node types a GPU run needs.
- The training commands (the RayJob's entrypoint, the `ray job submit` line of cluster/README.md
  for AWS) compose with Hydra exactly as `python -m raycg.train <overrides>` would, with a GPU
  trainer and paths on the shared mount; a misspelled override fails the same check.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import tomllib

import jsonschema
import pytest
import yaml
from hydra.errors import ConfigCompositionException

from raycg.config import compose

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "cluster")
SHARED = "/mnt/shared"  # where both definitions mount the storage every node sees
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ">", ">>", "2>", "2>&1"}


def ray_version() -> str:
    """The Ray that pyproject.toml pins (ray[...]==X): the clusters must run the same."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    (pin,) = [d for d in deps if re.match(r"ray(\[.*\])?==", d)]
    return pin.split("==")[1]


def load_yaml_docs(name: str) -> list[dict]:
    with open(os.path.join(CLUSTER, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


@pytest.fixture(scope="module")
def kuberay_docs() -> list[dict]:
    return load_yaml_docs("kuberay-rayjob.yaml")


@pytest.fixture(scope="module")
def rayjob(kuberay_docs) -> dict:
    (job,) = [d for d in kuberay_docs if d.get("kind") == "RayJob"]
    return job


@pytest.fixture(scope="module")
def launcher() -> dict:
    (config,) = load_yaml_docs("aws-gpu.yaml")
    return config


def groups(job: dict) -> list[tuple[str, dict]]:
    """(name, group spec) of the head group and every worker group."""
    spec = job["spec"]["rayClusterSpec"]
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def quantity(value) -> float:
    """A Kubernetes CPU/GPU quantity as a number ("500m" -> 0.5, "8" -> 8)."""
    value = str(value)
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def train_overrides(command: str) -> list[str]:
    """The Hydra overrides of the `python -m raycg.train` in a shell command line."""
    tokens = shlex.split(command.replace("\\\n", " "), comments=True)
    for i in range(len(tokens) - 2):
        if tokens[i:i + 3] == ["python", "-m", "raycg.train"]:
            args = []
            for token in tokens[i + 3:]:
                if token in SHELL_OPERATORS:
                    break
                args.append(token)
            return args
    raise AssertionError(f"no `python -m raycg.train` in {command!r}")


def readme_section(marker: str) -> str:
    """The `## ` section of cluster/README.md whose heading contains `marker`."""
    with open(os.path.join(CLUSTER, "README.md")) as f:
        sections = re.split(r"^(?=## )", f.read(), flags=re.M)
    (section,) = [s for s in sections if marker in s.splitlines()[0]]
    return section


def readme_train_commands(marker: str) -> list[str]:
    """Every shell command of the section's ```bash blocks that runs raycg.train."""
    blocks = re.findall(r"^```bash\n(.*?)^```", readme_section(marker), flags=re.M | re.S)
    commands = [c for b in blocks for c in b.replace("\\\n", " ").splitlines()]
    return [c for c in commands if "raycg.train" in c]


# -- KubeRay RayJob ---------------------------------------------------------------------------


def test_rayjob_top_level(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    # KubeRay 1.7 (utils/validation.go): a DNS-1035 label of at most 47 characters
    name = rayjob["metadata"]["name"]
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
    spec = rayjob["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].startswith("python -m raycg.train ")
    # ttlSecondsAfterFinished only acts (and, > 0, is only allowed) with shutdownAfterJobFinishes
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert spec["rayClusterSpec"]["rayVersion"] == ray_version()
    # runtimeEnvYAML is a YAML string; Ray requires string values in env_vars
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["PYTHONUNBUFFERED"] == "1"
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())


def test_rayjob_groups_have_the_required_fields(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    workers = cluster["workerGroupSpecs"]
    assert len(workers) == 2
    names = [g["groupName"] for g in workers]
    assert len(set(names)) == len(names)
    for name, group in groups(rayjob):
        containers = group["template"]["spec"]["containers"]
        assert containers, name
        for c in containers:
            assert c["name"] and c["image"], name
        # rayStartParams is map[string]string in the CRD: a bare 0 would be rejected
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), name
    for group in workers:
        # the operator refuses a group without min/max replicas while autoscaling is off
        lo, n, hi = group["minReplicas"], group["replicas"], group["maxReplicas"]
        assert all(isinstance(v, int) for v in (lo, n, hi)), group["groupName"]
        assert 0 <= lo <= n <= hi, group["groupName"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no Train/Data work on the head


def test_rayjob_gpu_and_cpu_groups(rayjob):
    version = rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    gpu_groups, cpu_groups = [], []
    for name, group in groups(rayjob)[1:]:
        (container,) = group["template"]["spec"]["containers"]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert f"ray{version}-py312" in container["image"], name  # built on rayproject/ray:<version>-py312[-gpu]
        if "nvidia.com/gpu" in limits:
            # an extended resource's request, when given, must equal its limit
            assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
            assert int(limits["nvidia.com/gpu"]) >= 1
            assert container["image"].endswith("-gpu"), name
            gpu_groups.append(name)
        else:
            assert not container["image"].endswith("-gpu"), name
            cpu_groups.append(name)
    assert len(gpu_groups) == 1 and len(cpu_groups) == 1


def test_rayjob_shared_volume_in_every_container(kuberay_docs, rayjob):
    (pvc,) = [d for d in kuberay_docs if d.get("kind") == "PersistentVolumeClaim"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # head and GPU pods write from different nodes
    for name, group in groups(rayjob):
        pod = group["template"]["spec"]
        shared = [v["name"] for v in pod["volumes"]
                  if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]]
        assert len(shared) == 1, name
        for c in pod["containers"]:
            mounts = [m["mountPath"] for m in c["volumeMounts"] if m["name"] == shared[0]]
            assert mounts == [SHARED], (name, c["name"])


def test_rayjob_entrypoint_composes(rayjob):
    cfg = compose(train_overrides(rayjob["spec"]["entrypoint"]))
    assert cfg.trainer.use_gpu is True
    assert cfg.ray.address is None  # the job API sets RAY_ADDRESS for the entrypoint
    for path in (cfg.paths.runs_dir, cfg.data.dir, cfg.data.train_path, cfg.data.items_path):
        assert path.startswith(SHARED + "/"), path
    # the Train workers fit the GPU group: one GPU and cpus_per_worker CPUs each
    (gpu,) = [g for _, g in groups(rayjob)[1:]
              if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus_per_pod = int(limits["nvidia.com/gpu"])
    assert cfg.trainer.num_workers == gpu["replicas"] * gpus_per_pod
    assert quantity(limits["cpu"]) >= gpus_per_pod * cfg.trainer.cpus_per_worker
    # the README tells where the run directory is
    assert f"{cfg.paths.runs_dir}/{cfg.run_name}/" in readme_section("kuberay-rayjob.yaml")


def test_misspelled_override_fails_to_compose(rayjob):
    entrypoint = rayjob["spec"]["entrypoint"]
    assert "trainer.num_workers=" in entrypoint
    with pytest.raises(ConfigCompositionException, match="num_wrkers"):
        compose(train_overrides(entrypoint.replace("trainer.num_workers=", "trainer.num_wrkers=")))
    with pytest.raises(ConfigCompositionException):  # a config group option that does not exist
        compose(train_overrides(entrypoint.replace("trainer=gpu", "trainer=gpus")))


# -- Ray cluster launcher (AWS) ---------------------------------------------------------------


def ray_schema() -> dict:
    import ray.autoscaler  # the package, not a cluster: nothing starts

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        return json.load(f)


def test_launcher_matches_ray_schema(launcher):
    schema = ray_schema()
    jsonschema.validate(launcher, schema)
    # the schema does reject what it does not know (additionalProperties: false at the top)
    typo = dict(launcher, head_node_typ=launcher["head_node_type"])
    with pytest.raises(jsonschema.ValidationError, match="head_node_typ"):
        jsonschema.validate(typo, schema)


def test_launcher_passes_ray_up_offline_checks(launcher):
    # What `ray up` does before it talks to AWS (ray/autoscaler/_private/commands.py,
    # _bootstrap_config): merge the AWS defaults, then validate the result.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(launcher))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_launcher_node_types_and_setup(launcher):
    assert launcher["provider"]["type"] == "aws" and launcher["provider"]["region"]
    assert launcher["auth"]["ssh_user"]
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # the driver's node: no Train/Data work
    (gpu,) = [t for name, t in types.items() if t["resources"].get("GPU", 0) > 0]
    assert gpu["node_config"]["InstanceType"]
    assert 1 <= gpu["min_workers"] <= gpu["max_workers"] <= launcher["max_workers"]
    # every node runs Ray's image of the pinned version, and mounts the shared storage there too
    assert launcher["docker"]["image"] == f"rayproject/ray:{ray_version()}-py312-gpu"
    assert f"-v {SHARED}:{SHARED}" in launcher["docker"]["run_options"]
    assert any(f" {SHARED}" in c and "mount" in c for c in launcher["initialization_commands"])
    # this checkout is synced to the nodes and installed from there
    (remote,) = [r for r, local in launcher["file_mounts"].items() if local == "."]
    assert f"pip install -q -e {remote}" in launcher["setup_commands"]
    assert any("ray start --head" in c for c in launcher["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in launcher["worker_start_ray_commands"])


def test_launcher_readme_command_composes(launcher):
    (command,) = readme_train_commands("aws-gpu.yaml")
    assert command.lstrip().startswith("ray job submit ")
    cfg = compose(train_overrides(command))
    assert cfg.trainer.use_gpu is True
    assert cfg.paths.runs_dir.startswith(SHARED + "/") and cfg.data.dir.startswith(SHARED + "/")
    # it fits the GPU workers that start with the cluster (min_workers), no autoscaling needed
    gpu = next(t for t in launcher["available_node_types"].values() if t["resources"].get("GPU", 0) > 0)
    assert cfg.trainer.num_workers <= gpu["min_workers"] * gpu["resources"]["GPU"]
    assert cfg.trainer.num_workers * cfg.trainer.cpus_per_worker <= gpu["min_workers"] * gpu["resources"]["CPU"]
    assert f"{cfg.paths.runs_dir}/{cfg.run_name}" in readme_section("aws-gpu.yaml")
