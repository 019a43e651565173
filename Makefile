# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER = 0
export PYTHONUNBUFFERED = 1

.PHONY: env demo test test-fast bench bench-smoke bench-scale bench-eval bench-counts bench-tables bench-retrieve report clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# simulate -> train (2 Ray Train workers) -> evaluate -> recall table + run directory
demo: $(STAMP)
	$(PY) -m raycg.train

# the full suite (what CI runs); test-fast: the unit tier, no Ray (tests/conftest.py marks the rest slow)
test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) benchmarks/ingest.py

# evaluation at corpus scale: 1M items x ~100k queries (random-init model; times, not recall)
bench-eval: $(STAMP)
	$(PY) benchmarks/eval_scale.py

# the feature-store pass (per-id counts of ~25M events, 10x sim_crossed): Arrow hash aggregation vs
# the previous numpy sort, side by side
bench-counts: $(STAMP)
	$(PY) benchmarks/feature_counts.py

# step time vs id-table size: dense tables + Adam vs sparse tables (10k vs 1M items)
bench-tables: $(STAMP)
	$(PY) benchmarks/table_scale.py

# retrieval from an export: single-request p50/p99 and batch throughput (100k items, random-init model)
bench-retrieve: $(STAMP)
	$(PY) benchmarks/retrieve_latency.py --ray

# issue 11's benchmark: 1M items, 2M users, ~100M events, one epoch with sparse tables, evaluation on
# the full corpus, step time vs 10k items (hours on 2 CPU cores; add trainer=gpu on a GPU host:
# make bench-scale ARGS=trainer=gpu)
bench-scale: $(STAMP)
	$(PY) benchmarks/bench_scale.py $(ARGS)

# every benchmark at a tiny size, to its final table (a few minutes): run it before GPU time
bench-smoke: $(STAMP)
	RAYCG_BENCH_SMOKE=1 $(PY) -m pytest -q tests/test_benchmarks.py

# ablation grids x 3 seeds + baselines -> report/ and docs/results.md (about 1 h on 2 cores)
report: $(STAMP)
	$(PY) -m raycg.report publish=docs/results.md

clean:
	rm -rf runs data/sim outputs report .pytest_cache
