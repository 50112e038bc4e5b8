"""The package's layers (docs/architecture.md): every import in src/cifarlab, at module level or
inside a function, points to the same layer or one below, and no two modules import each other
(directly or round a loop)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# lowest first; a module belongs to the layer of its longest listed prefix
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base: errors, files, choices", ("cifarlab", "cifarlab.errors", "cifarlab.files", "cifarlab.choices",
                                      "cifarlab.schedules", "cifarlab.plots")),
    ("data", ("cifarlab.data",)),
    ("models and ops", ("cifarlab.registry", "cifarlab.models", "cifarlab.numpy_nn", "cifarlab.ops")),
    ("training", ("cifarlab.training", "cifarlab.numpy_nn.train")),
    ("study", ("cifarlab.study",)),
    ("command line", ("cifarlab.cli", "cifarlab.__main__")),
]  # fmt: skip


def layer_of(module: str) -> int:
    best = max(
        ((len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
         if module == prefix or module.startswith(prefix + ".")),
        default=None,
    )  # fmt: skip
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)"
    return best[1]


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted((SRC / "cifarlab").rglob("*.py")):
        parts = f.with_suffix("").relative_to(SRC).parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The cifarlab modules ``path`` imports (``from cifarlab import x`` names module x)."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cifarlab"):
            names = [f"{node.module}.{a.name}" for a in node.names]
            deps |= {n for n in names if n in known} or {node.module}
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.startswith("cifarlab")}
    return deps


def graph() -> dict[str, set[str]]:
    mods = modules()
    g = {m: imports(p, set(mods)) - {m} for m, p in mods.items()}
    # a package's __init__ that gathers its own modules (cifarlab.models) is not a dependency
    # of those modules on each other; the root package holds only the version
    return {m: {d for d in deps if not (d != "cifarlab" and m.startswith(d + "."))} for m, deps in g.items()}


def test_every_import_points_to_its_layer_or_below():
    upward = [
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
        for m, deps in graph().items()
        for d in deps
        if layer_of(d) > layer_of(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    g = graph()
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        seen[m] = 1
        for d in sorted(g.get(m, ())):
            if d == "cifarlab" or d not in g:
                continue
            assert seen.get(d) != 1, "import cycle: " + " -> ".join([*path[path.index(d) :], d])
            if d not in seen:
                visit(d, [*path, d])
        seen[m] = 2

    for m in g:
        if m not in seen:
            visit(m, [m])


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The walk finds imports inside functions too (most upward ones hid there)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from cifarlab.cli import main\n    from cifarlab.study import report\n")
    assert imports(f, {"cifarlab.cli", "cifarlab.study.report"}) == {"cifarlab.cli", "cifarlab.study.report"}
    assert layer_of("cifarlab.cli") > layer_of("cifarlab.data")
