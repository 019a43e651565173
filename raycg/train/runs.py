"""Finding things in a run directory."""
from __future__ import annotations

import glob
import os


def latest_checkpoint(run_dir: str) -> str:
    """The newest `checkpoint_*` directory of a run (Ray Train names them by time)."""
    found = sorted(d for d in glob.glob(os.path.join(run_dir, "checkpoint_*")) if os.path.isdir(d))
    if not found:
        raise FileNotFoundError(f"{run_dir}: no checkpoint_* directory (has this run trained an epoch?)")
    return found[-1]


def parse_overrides(argv: list[str], allowed: dict[str, str | None]) -> dict[str, str]:
    """`key=value` command-line arguments (Hydra style) for the small run-dir tools."""
    out = dict(allowed)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in allowed:
            raise SystemExit(f"unknown argument {arg!r}; expected key=value with key in {sorted(allowed)}")
        out[key] = value
    missing = [k for k, v in out.items() if v is None]
    if missing:
        raise SystemExit(f"missing required argument(s): {', '.join(f'{k}=...' for k in missing)}")
    return out
