"""raycg's log: one logger tree ("raycg.*"), one format, on stdout, INFO by default.

    log = get_logger("train")           logging.getLogger("raycg.train")
    log.info("data: ...")               -> "[raycg] data: ..."
    log.warning("20 of ... rows")       -> "[raycg] WARNING: 20 of ... rows"
    set_level("WARNING")                every raycg logger (the config key `log_level`)
    log = rank_zero_logger("train", rank)   a training worker's logger: lines of ranks > 0
                                        are dropped, unless logged with extra=EVERY_RANK
    for x in progress(xs, total=n, desc="...")   a tqdm bar with an ETA, for long driver-side work
    phases = PhaseTimes(); phases.mark("read")   "read 3.1s, pack 0.4s": where a long step's time went

One handler, on the "raycg" logger, with propagate=False: Hydra's job logging sets the root
logger to WARNING (which would hide INFO if raycg's records went through it) and Ray Train adds
handlers to the root logger in its workers (which would print each line twice). The handler
writes to the *current* `sys.stdout` with `write`, never `print`: Ray Train replaces `print` in
its workers with one that prints AND logs; the current stream is what pytest's capture sees.

Command outputs (the recall table, raycg-simulate's JSON, raycg-export's file list,
raycg-convert's summary) are not log lines: their entry points print them.

Progress bars go to stderr and are off when stderr is not a terminal (CI logs, pipes), when
RAYCG_PROGRESS=0, or when the level hides INFO.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager

ROOT = "raycg"
PREFIX = "[raycg] "
EVERY_RANK = {"every_rank": True}  # extra= of a worker line that every rank logs ("rank 1: cuda:1")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class Formatter(logging.Formatter):
    """"[raycg] message"; "[raycg] WARNING: message" at WARNING and above."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        level = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        return PREFIX + level + text


class RankZeroFilter(logging.Filter):
    """Drops records of training ranks > 0 (a `rank` attribute, set by `rank_zero_logger`)
    unless they are marked every_rank (extra=EVERY_RANK); records without a rank pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "rank", 0) == 0 or bool(getattr(record, "every_rank", False))


class StdoutHandler(logging.StreamHandler):
    """A StreamHandler on whatever `sys.stdout` is when a record is emitted."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _):  # StreamHandler.__init__ sets it; the current sys.stdout is used instead
        pass

    def emit(self, record: logging.LogRecord) -> None:
        bars = sys.modules.get("tqdm")  # a progress bar on the terminal: clear it, write, redraw it
        if bars is not None and getattr(bars.tqdm, "_instances", None):
            with bars.tqdm.external_write_mode(file=self.stream):
                super().emit(record)
        else:
            super().emit(record)


def _install() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not any(getattr(h, "_raycg", False) for h in root.handlers):
        handler = StdoutHandler()
        handler._raycg = True
        handler.setFormatter(Formatter())
        handler.addFilter(RankZeroFilter())
        root.addHandler(handler)
        root.propagate = False
        root.setLevel(_level(os.environ.get("RAYCG_LOG_LEVEL", "INFO")))
    return root


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    name = str(level).upper()
    if name not in LEVELS:
        raise ValueError(f"log_level={level}: expected one of {', '.join(LEVELS)}")
    return getattr(logging, name)


def get_logger(name: str) -> logging.Logger:
    """The logger "raycg.<name>" (its records go through raycg's one handler)."""
    _install()
    return logging.getLogger(f"{ROOT}.{name}")


def set_level(level: str | int) -> None:
    """The level of every raycg logger: DEBUG, INFO (the default), WARNING or ERROR."""
    _install().setLevel(_level(level))


class RankLogger(logging.LoggerAdapter):
    """A logger that stamps each record with the worker's rank; the caller's `extra` is kept."""

    def process(self, msg, kwargs):
        kwargs["extra"] = {**self.extra, **(kwargs.get("extra") or {})}
        return msg, kwargs


def rank_zero_logger(name: str, rank: int) -> RankLogger:
    """A training worker's logger: its lines appear on rank 0 only, except those logged with
    extra=EVERY_RANK (per-rank lines, which should then say their rank)."""
    return RankLogger(get_logger(name), {"rank": int(rank)})


def progress(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it"):
    """A tqdm progress bar (with an ETA when `total` is known) on stderr; disabled when stderr
    is not a terminal, with RAYCG_PROGRESS=0, or when raycg's level hides INFO."""
    from tqdm import tqdm

    off = (os.environ.get("RAYCG_PROGRESS", "1").strip().lower() in ("0", "false", "no", "off")
           or not _install().isEnabledFor(logging.INFO))
    return tqdm(iterable, total=total, desc=PREFIX + desc, unit=unit, file=sys.stderr, leave=False,
                dynamic_ncols=True, disable=True if off else None)


class PhaseTimes:
    """Wall seconds per named phase, summed over repeats, for "where did a long step's time go":

        phases = PhaseTimes()
        with phases("corpus embedding"): ...      # a block
        phases.mark("feature store")              # or: the time since the previous mark (or creation)
        str(phases)                               # "corpus embedding 3.5s, feature store 31.2s"
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            now = time.perf_counter()
            self.add(name, now - t0)
            self._last = now

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.add(name, now - self._last)
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{name} {s:.1f}s" for name, s in self.seconds.items())
