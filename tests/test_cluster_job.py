"""`ray job submit` path on a real local head node (`ray start --head --block`, loopback).

What cluster/README.md tells users to do, end to end: start a head node, submit
`python -m raycg.train` through the job API with the working dir + cluster/runtime_env.yaml,
wait for SUCCEEDED, check the run directory the job wrote, stop the node.

The node is this test's own: free ports, its own --temp-dir, started as a child process in its
own session and stopped with SIGTERM (never `ray stop`, which would kill every Ray process on
the machine). Everything cluster-specific (RAY_AUTH_MODE, PATH, ...) goes into the subprocess
env only, so the session's embedded Ray (conftest `ray_session`) is left alone.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The interpreter running pytest lives in the project's venv; its bin dir goes first on the
# node's PATH so that the job entrypoint's `python` is this venv's python (raycg + deps).
VENV_BIN = os.path.dirname(sys.executable)
RAY_CLI = os.path.join(VENV_BIN, "ray")

START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 420
STOP_TIMEOUT_S = 60


def free_ports(n: int) -> list[int]:
    """n distinct ports that were free on 127.0.0.1 a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time) of a live process from /proc, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0], int(fields[19])


def descendants(root_pid: int) -> dict[int, int]:
    """{pid: start time} of every live descendant of root_pid (Linux /proc)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _proc_stat(int(name))) is not None:
            children.setdefault(st[0], []).append(int(name))
            starts[int(name)] = st[2]
    out, todo = {}, list(children.get(root_pid, []))
    while todo:
        pid = todo.pop()
        out[pid] = starts[pid]
        todo.extend(children.get(pid, []))
    return out


def still_alive(procs: dict[int, int]) -> list[int]:
    """The pids of `procs` that are still the same, non-zombie process."""
    alive = []
    for pid, start in procs.items():
        st = _proc_stat(pid)
        if st is not None and st[2] == start and st[1] != "Z":
            alive.append(pid)
    return alive


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def tail(path: str, n: int = 6000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError as e:
        return f"<{path}: {e}>"


class HeadNode:
    """A `ray start --head --block` child process and what the test needs to talk to it."""

    def __init__(self, proc: subprocess.Popen, gcs_port: int, dashboard_port: int, temp_dir: str,
                 log_path: str):
        self.proc = proc
        self.gcs_port = gcs_port
        self.dashboard_port = dashboard_port
        self.temp_dir = temp_dir
        self.log_path = log_path
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{tail(self.log_path)}")
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"dashboard not up after {timeout_s}s:\n{tail(self.log_path)}")

    def stop(self) -> list[str]:
        """SIGTERM the `ray start --block` process (it stops the processes it started), wait.

        Returns a description of anything that had to be killed by force (empty when clean).
        """
        leftovers = []
        tree = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                leftovers.append(f"ray start (pid {self.proc.pid}) ignored SIGTERM for {STOP_TIMEOUT_S}s")
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only what we started
                self.proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while still_alive(tree) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in still_alive(tree):  # processes of our node that outlived it: ours, by pid
            leftovers.append(f"pid {pid}: {cmdline(pid)}")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return leftovers


@pytest.fixture
def head_node(tmp_path):
    """A real head node on 127.0.0.1 with free ports; always stopped afterwards."""
    import ray

    if ray.is_initialized():  # the session's embedded Ray (conftest ray_session): never two clusters at once
        ray.shutdown()
    gcs_port, dashboard_port, client_port, agent_http_port = free_ports(4)
    # Short temp dir: Ray puts unix sockets under it (~107 character limit on socket paths).
    temp_dir = tempfile.mkdtemp(prefix="rcg-", dir="/tmp")
    log_path = str(tmp_path / "ray_start.log")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        PATH=VENV_BIN + os.pathsep + env.get("PATH", ""),
        RAY_AUTH_MODE="disabled",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
        # SIGTERM makes `ray start --block` first wait up to this long (default 30 s) for the
        # node to drain; nothing runs on it by then, so skip straight to stopping its processes.
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        # Ray Train's PlacementGroupCleaner actor queries the state API with address=None. With a
        # --temp-dir of its own, the node is not in /tmp/ray/ray_current_cluster, so that lookup
        # falls back to pgrep'ing gcs_server and dies with "ConnectionError: Found multiple active
        # Ray instances" whenever another Ray runs on the machine (or, worse, follows that file to
        # someone else's cluster). Workers inherit the node's env: point them at this node.
        RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dashboard_port}",
    )
    cmd = [
        RAY_CLI, "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
        f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_http_port}",
        # 0/0: workers bind OS-assigned ports instead of the default 10002-19999 range that
        # another Ray on this machine may be using; other internal ports default to free ones.
        "--min-worker-port=0", "--max-worker-port=0",
        "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    node = None
    leftovers: list[str] = []
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        node = HeadNode(proc, gcs_port, dashboard_port, temp_dir, log_path)
        node.wait_ready(START_TIMEOUT_S)
        yield node
    finally:
        if node is not None:
            leftovers = node.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not leftovers, "processes outlived `ray start --block` after SIGTERM:\n" + "\n".join(leftovers)
    deadline = time.monotonic() + 30
    while listening(gcs_port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not listening(gcs_port), f"something still listens on the GCS port {gcs_port}"


def runtime_env_for_repo() -> dict:
    """cluster/runtime_env.yaml + working_dir, as `ray job submit --working-dir . --runtime-env` builds it."""
    with open(os.path.join(ROOT, "cluster", "runtime_env.yaml")) as f:
        runtime_env = yaml.safe_load(f)
    runtime_env["working_dir"] = ROOT
    return runtime_env


@pytest.mark.cluster
def test_submit_training_job_to_local_head_node(head_node, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    runs_dir, data_dir = tmp_path / "runs", tmp_path / "data"
    run_name = "cluster-smoke"
    # the README's smoke job, made smaller: the job simulates the tiny dataset, 1 worker, 1 baseline
    from conftest import TINY_SIM

    entrypoint = (f"python -m raycg.train experiment=smoke trainer.epochs=1 run_name={run_name} "
                  f"paths.runs_dir={runs_dir} data.dir={data_dir} trainer.num_workers=1 trainer.batch_size=256 "
                  "'eval.baselines=[popularity]' export=false " + " ".join(f"data.sim.{k}={v}" for k, v in TINY_SIM.items()))

    client = JobSubmissionClient(head_node.dashboard_url)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env_for_repo(),
                               submission_id=f"raycg-test-{uuid.uuid4().hex[:8]}")

    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(2)
        status = client.get_job_status(job_id)
    if not status.is_terminal():
        client.stop_job(job_id)
    logs = client.get_job_logs(job_id)
    info = client.get_job_info(job_id)
    print(f"job {job_id}: {status}\n{logs[-4000:]}")  # shown with `pytest -rP`
    assert status == JobStatus.SUCCEEDED, (
        f"job {job_id}: {status} after <= {JOB_TIMEOUT_S}s ({info.message})\n--- job logs (tail) ---\n"
        f"{logs[-8000:]}\n--- ray start log (tail) ---\n{tail(head_node.log_path, 3000)}")

    # The job ran in a copy of the working dir; it wrote where the absolute paths pointed.
    run_dir = runs_dir / run_name
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1, lines
    epoch = json.loads(lines[0])
    assert epoch["epoch"] == 0 and math.isfinite(epoch["loss"]) and epoch["rows"] > 0, epoch
    assert (data_dir / "meta.json").exists()

    results = json.loads((run_dir / "eval.json").read_text())
    assert results["ks"] and "conversion" in results["model"], results
    for task, by_k in results["model"].items():
        assert sorted(int(k) for k in by_k) == results["ks"], (task, by_k)
        for k, recall in by_k.items():
            assert 0.0 <= recall <= 1.0, (task, k, recall)  # also false for NaN
        assert results["n_queries"][task] > 0
