"""Every benchmark script still runs: each at a tiny size, to its final table (numbers unchecked:
timings belong to the benchmarks themselves, not to tests).

Benchmarks are not run by the rest of the suite, so they rot silently (stop 24 found three
broken: a config path that had moved, an unresolved `duration_weighting=auto`, a GPU-benchmark
smoke mode whose warm-up outlasted its run). The two cheap ones run in every `make test`; the
rest, which start Ray or train for tens of seconds, run with `make bench-smoke` (set
RAYCG_BENCH_SMOKE=1), the check to run before spending GPU time.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

BENCH_DIR = os.path.join(ROOT, "benchmarks")

# script -> (tiny arguments, a pattern its final output must contain)
SMOKE = {
    "batch_users.py": (["data=sim_small", "data.sim.n_users=400", "data.sim.n_items=300", "data.sim.n_advertisers=20",
                        "data.sim.n_categories=10", "data.sim.requests_per_user=12", "trainer.num_workers=2",
                        "trainer.batch_size=128", "data.shuffle=none"],
                       r"data.shuffle=none, 2 x 128, \d+ steps .*\n  other rows of the same user per row: [\d.]+ .*"
                       r"global permutation [\d.]+ .*ratio [\d.]+x"),
    "bench_scale.py": (["--items", "20000", "--users", "3000", "--small-items", "2000", "--step-steps", "3"],
                       r"train +[\d,]+ rows/epoch .*\neval .*\neval phases:\n(  .*\n)+step +sparse_adam at 2,000 items "
                       r".* [\d.]+x"),
    "retrieve_latency.py": (["--items", "3000", "--users", "300", "--requests", "30", "--batch-requests", "300",
                             "--index", "hnsw"], r"single request .* p99 .*\nbatch in-process .* requests/s"),
    "table_scale.py": (["--items", "1000", "4000", "--steps", "3", "--warmup", "1"],
                       r"\(ratio = step time at 4,000 items / at 1,000"),
    "feature_counts.py": (["--users", "300", "--items", "300", "--repeats", "1"],
                          r"same counts from both .*\n.*\nnumpy_sort .*\narrow_hash +[\d.]+ +[\d.]+ +[\d,]+ +[\d.]+x"),
    "ingest.py": (["--users", "200", "--items", "200", "--epochs", "1"], r"ray_packed_mat +[\d,]+ +[\d.]+x"),
    "ingest_gil.py": (["--users", "300", "--items", "300", "--epochs", "1", "--repeats", "1"],
                      r"process +[\d.]+ +[\d,]+ +[\d.]+x"),
    "eval_scale.py": (["--items", "3000", "--users", "300", "--max-queries", "50"],
                      r"\[eval_scale\] evaluate_checkpoint [\d.]+s.*\n\[eval_scale\] evaluation phases:\n(  .*\n)*"
                      r"  model exact search +[\d.]+s"),
    "gpu_train.py": (["--cpu-smoke", "--users", "500", "--epochs", "1", "--warmup", "2", "--batch-size", "256",
                      "--history", "on"], r"on +ray x1 GPU, compile default +[\d,]+"),
    "gpu_step_check.py": (["--cpu", "--steps", "3"], r"compiled-bf16 +[\d.]+ "),
}
IN_SUITE = {"retrieve_latency.py", "table_scale.py"}  # seconds each, no Ray


def test_every_benchmark_has_a_smoke_run():
    assert sorted(f for f in os.listdir(BENCH_DIR) if f.endswith(".py")) == sorted(SMOKE)


@pytest.mark.slow  # a subprocess that imports torch and runs for seconds: not the unit tier
@pytest.mark.parametrize("script", [
    pytest.param(s, marks=() if s in IN_SUITE else pytest.mark.skipif(
        not os.environ.get("RAYCG_BENCH_SMOKE"), reason="starts Ray or trains: `make bench-smoke` runs it"))
    for s in sorted(SMOKE)])
def test_benchmark_runs_to_its_table(script, tmp_path):
    args, expected = SMOKE[script]
    if script in ("gpu_train.py", "gpu_step_check.py"):
        args = [*args, "--out", str(tmp_path)]
    if script in ("ingest.py", "ingest_gil.py", "feature_counts.py"):
        args = [*args, "--data-dir", str(tmp_path / "data")]
    if script == "batch_users.py":
        args = [*args, f"data.dir={tmp_path / 'data'}"]
    if script == "bench_scale.py":
        args = [*args, "--runs-dir", str(tmp_path / "runs"), f"data.dir={tmp_path / 'data'}"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run([sys.executable, os.path.join(BENCH_DIR, script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(expected, proc.stdout), proc.stdout[-3000:]
    assert "FAILED" not in proc.stdout, proc.stdout[-3000:]
