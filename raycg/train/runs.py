"""`key=value` arguments of the small run-directory tools (raycg.evaluate, raycg.export)."""
from __future__ import annotations


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
