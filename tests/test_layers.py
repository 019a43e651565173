"""The import rule of docs/architecture.md: every raycg module imports only its own package
or packages below it.

    base      raycg (the package), raycg.checksums, raycg.config (the config schemas and compose),
              raycg.logs (the log: one format, the rank-zero logger, progress bars)
    data      raycg.data      schema, feature spec, id lookup, data-dir I/O, pipeline; the
                              simulator and the log converters on top of those
    model     raycg.model     towers, the two-tower model, its checkpoint format and export
    losses    raycg.losses
    eval      raycg.eval      queries, recall, baselines and the model as retrievers
    serve     raycg.retrieve  the export's item index and retrieval API (raw request -> top-K)
    train     raycg.train     the Ray Train loop and the driver (train -> evaluate -> export)
    top       raycg.report, raycg.tune (neither imports the other)
    entry     raycg.convert, raycg.evaluate, raycg.export, raycg.simulate (command lines; import anything)

Inside raycg.data the two data sources (the simulator; the log converters) import the shared
data modules and never each other, and the shared modules import neither source.

Every import counts, also one inside a function. Scripts outside the package (tune/,
benchmarks/) are entry points and not checked. A new module of the package must be placed
here (the test fails on an unknown module).
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYERS = [  # lowest first: (level, packages at that level)
    ("base", ["raycg", "raycg.checksums", "raycg.config", "raycg.host", "raycg.logs"]),
    ("data", ["raycg.data"]),
    ("model", ["raycg.model"]),
    ("losses", ["raycg.losses"]),
    ("eval", ["raycg.eval"]),
    ("serve", ["raycg.retrieve"]),
    ("train", ["raycg.train"]),
    ("top", ["raycg.report", "raycg.tune"]),
    ("entry", ["raycg.convert", "raycg.evaluate", "raycg.export", "raycg.simulate"]),
]
# the data sources of raycg.data (each a family of modules); everything else in raycg.data is shared
DATA_SOURCES = {
    "simulator": ["raycg.data.simulate", "raycg.data.sim"],
    "converter": ["raycg.data.adapters", "raycg.data.logmap", "raycg.data.source", "raycg.data.hashing"],
}
ALLOWED: set[tuple[str, str]] = set()  # (importer, imported) exceptions: none


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def place(module: str) -> tuple[int, str]:
    """(level, unit): the longest listed prefix of `module`; units at one level are separate."""
    best = None
    for level, (_, units) in enumerate(LAYERS):
        for unit in units:
            if _within(module, unit) and (unit != "raycg" or module == "raycg") and (
                    best is None or len(unit) > len(best[1])):
                best = (level, unit)
    if best is None:
        raise AssertionError(f"{module}: not placed in a layer; add it to LAYERS in tests/test_layers.py "
                             "and docs/architecture.md")
    return best


def data_source(module: str) -> str | None:
    for name, prefixes in DATA_SOURCES.items():
        if any(_within(module, p) for p in prefixes):
            return name
    return None


def modules() -> dict[str, str]:
    """raycg module name -> file path."""
    out = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, "raycg")):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(dirpath, f)
    return out


def imports(module: str, path: str, known: set[str]) -> set[str]:
    """The raycg modules `module` imports (anywhere in the file); `from raycg.x import y` is
    raycg.x.y when that is a module."""
    is_package = os.path.basename(path) == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if _within(a.name, "raycg")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative
                parts = module.split(".")
                base = parts if is_package else parts[:-1]
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if not _within(name, "raycg"):
                continue
            subs = {f"{name}.{a.name}" for a in node.names} & known
            out |= subs or {name}
    out.discard(module)
    return out


def violations() -> list[str]:
    found = modules()
    known = set(found)
    bad = []
    for module, path in sorted(found.items()):
        level, unit = place(module)
        source = data_source(module)
        for target in sorted(imports(module, path, known)):
            if (module, target) in ALLOWED:
                continue
            t_level, t_unit = place(target)
            if t_level > level or (t_level == level and t_unit != unit and LAYERS[level][0] != "entry"):
                bad.append(f"{module} ({LAYERS[level][0]}) imports {target} ({LAYERS[t_level][0]})")
            elif unit == t_unit == "raycg.data":
                t_source = data_source(target)
                if t_source is not None and t_source != source:
                    what = f"the {source} source" if source else "a shared data module"
                    bad.append(f"{module} ({what}) imports {target} (the {t_source} source)")
    return bad


def test_every_import_points_down():
    bad = violations()
    assert not bad, "imports against the layering (docs/architecture.md):\n  " + "\n  ".join(bad)


def test_the_checker_sees_upward_imports(tmp_path):
    # the resolution the rule relies on: absolute, relative, `from pkg import module`
    p = tmp_path / "m.py"
    p.write_text("from raycg.train import checkpoint\nfrom ..train.loop import x\nimport raycg.report.grid\n"
                 "def f():\n    from raycg.data import simulate\n")
    known = {"raycg.train.checkpoint", "raycg.train.loop", "raycg.report.grid", "raycg.data.simulate"}
    assert imports("raycg.eval.m", str(p), known) == known
    assert place("raycg.eval.m") == (4, "raycg.eval")
    assert place("raycg.convert") == (8, "raycg.convert")
    assert data_source("raycg.data.sim.world") == "simulator" and data_source("raycg.data.io") is None


if __name__ == "__main__":  # the list, for a quick look
    print("\n".join(violations()) or "no upward imports")
