"""raycg.logs: one format on stdout, rank-zero filtering in training workers, the level from
the config, progress bars off outside a terminal, and no stray `print` in the package. No Ray."""
from __future__ import annotations

import ast
import logging
import os

import pytest

from raycg.logs import EVERY_RANK, get_logger, progress, rank_zero_logger, set_level

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the only `print` calls of the package: a command's output (its result), not log lines
PRINT_ALLOWED = {
    ("raycg/evaluate.py", "main"),         # the recall table
    ("raycg/train/driver.py", "run"),      # the run's recall table (raycg-train, report runs, trials)
    ("raycg/export.py", "main"),           # the files written
    ("raycg/simulate.py", "main"),         # the dataset's JSON summary
    ("raycg/convert.py", "main"),          # the data directory's summary, or the error on stderr
    ("raycg/tune/sweep.py", "run_sweep"),  # the sweep's table
    ("raycg/retrieve/__main__.py", "run"),   # one request's top-K (JSON)
    ("raycg/retrieve/__main__.py", "main"),  # the error on stderr
}


@pytest.fixture
def level():
    yield
    set_level("INFO")


def test_one_format_on_stdout(capsys, level):
    log = get_logger("test")
    assert log.name == "raycg.test"
    log.info("data: 3 rows")
    log.warning("20 of 100 rows quarantined")
    log.debug("not shown at INFO")
    assert capsys.readouterr().out == "[raycg] data: 3 rows\n[raycg] WARNING: 20 of 100 rows quarantined\n"


def test_hydra_s_warning_root_level_does_not_hide_raycg_lines(capsys):
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.WARNING)  # what raycg/conf/common/hydra.yaml sets
    try:
        get_logger("test").info("still shown")
    finally:
        root.setLevel(before)
    assert capsys.readouterr().out == "[raycg] still shown\n"


def test_rank_zero_logger_drops_other_ranks_but_per_rank_lines(capsys):
    rank_zero_logger("train", 0).info("epoch 0 done")
    rank_zero_logger("train", 1).info("epoch 0 done (rank 1)")
    rank_zero_logger("train", 1).info("rank 1: cuda:1", extra=EVERY_RANK)
    rank_zero_logger("train", 1).warning("rank 1 warning, dropped too")
    assert capsys.readouterr().out == "[raycg] epoch 0 done\n[raycg] rank 1: cuda:1\n"


def test_warning_level_hides_info(capsys, level):
    log = get_logger("test")
    set_level("WARNING")
    log.info("progress")
    log.warning("careful")
    assert capsys.readouterr().out == "[raycg] WARNING: careful\n"
    with pytest.raises(ValueError, match="log_level=LOUD"):
        set_level("LOUD")


def test_every_app_config_has_a_log_level():
    from raycg.config import compose
    from raycg.config.schema import LogLevel

    from raycg.logs import LEVELS

    assert [m.value for m in LogLevel] == list(LEVELS)
    for app, required in [("config", []), ("sweep", []), ("report", []), ("evaluate", ["run_dir=r"]),
                          ("export", ["run_dir=r"]), ("simulate", ["out=o"]),
                          ("convert", ["mapping=tmall", "input=i", "out_dir=o"])]:
        assert compose([*required], config_name=app).log_level == "INFO"
        assert compose([*required, "log_level=WARNING"], config_name=app).log_level == "WARNING"


def test_progress_bar_is_off_outside_a_terminal_and_when_asked(monkeypatch, capsys, level):
    with progress(total=3, desc="x") as bar:  # pytest's captured stderr is not a terminal
        assert bar.disable
    monkeypatch.setenv("RAYCG_PROGRESS", "0")
    assert progress(total=3).disable
    monkeypatch.delenv("RAYCG_PROGRESS")
    set_level("WARNING")
    assert progress(total=3).disable
    assert list(progress(range(3))) == [0, 1, 2]  # still iterates
    assert capsys.readouterr().err == ""


def _prints(path: str) -> list[tuple[str, int]]:
    """(enclosing top-level function or class, line) of every print(...) call in the file."""
    tree = ast.parse(open(path).read(), path)
    out = []
    for top in tree.body:
        for node in ast.walk(top):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                out.append((getattr(top, "name", "<module>"), node.lineno))
    return out


def test_no_print_in_the_package_but_command_outputs():
    found = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "raycg")):
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)
                found += [(rel, where, line) for where, line in _prints(os.path.join(dirpath, f))]
    stray = [f"{rel}:{line} (in {where})" for rel, where, line in found if (rel, where) not in PRINT_ALLOWED]
    assert not stray, "print() outside a command's output; use raycg.logs.get_logger(...):\n  " + "\n  ".join(stray)
    assert {(rel, where) for rel, where, _ in found} == PRINT_ALLOWED  # the allow-list is not stale


def test_phase_times_name_each_phase_with_the_time_since_the_previous_mark_or_its_block(monkeypatch):
    from raycg import logs

    # start, three marks, then a block (its start and end) and one more mark after it
    clock = iter([100.0, 101.5, 101.75, 104.0, 110.0, 111.0, 111.5])
    monkeypatch.setattr(logs.time, "perf_counter", lambda: next(clock))
    phases = logs.PhaseTimes()
    for name in ("feature store", "vocabularies", "training split"):
        phases.mark(name)
    with phases("vocabularies"):  # a repeated name sums
        pass
    phases.mark("moments")  # from the end of the block
    assert str(phases) == "feature store 1.5s, vocabularies 1.2s, training split 2.2s, moments 0.5s"
