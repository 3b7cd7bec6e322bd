"""The package's shape, enforced: the import rule of docs/architecture.md, a lazy public API, quick
commands without torch, and short modules and functions."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "embedcache"
REPO = PACKAGE.parent

#: Layers, lowest first: a module imports from its own unit and from lower layers only; units of
#: one layer never import each other. (A unit is a top-level module or a subpackage.)
LAYERS = [
    ("errors",),
    ("runtime", "splits", "fileio"),
    ("sources", "models", "heads", "store"),
    ("extraction",),
    ("experiments",),
    ("cli",),
]
LAYER_OF = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
#: The facade may name any module (it imports them lazily by string); nothing imports it back
#: except for the version.
FACADE = "embedcache"
ENTRY_POINTS = {"embedcache.__main__"}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import statement, module level
    and inside functions, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(base, alias.name, node.lineno) for alias in node.names]
    return found


def internal_edges() -> list[tuple[str, str, str | None, int]]:
    """(importer, imported module, imported name, line) for imports of our own modules; ``from
    pkg import mod`` resolves to ``pkg.mod`` when that is a module."""
    mods = modules()
    edges = []
    for name, path in mods.items():
        for target, attr, line in imports_of(path, name):
            if not (target == "embedcache" or target.startswith("embedcache.")):
                continue
            if attr is not None and f"{target}.{attr}" in mods:
                target, attr = f"{target}.{attr}", None
            edges.append((name, target, attr, line))
    return edges


def unit(name: str) -> str:
    return name.split(".")[1] if name.count(".") >= 1 else name


def test_every_unit_has_a_layer():
    units = {unit(m) for m in modules() if m != FACADE and m not in ENTRY_POINTS}
    assert units <= set(LAYER_OF), f"modules outside every layer: {sorted(units - set(LAYER_OF))}"


def test_imports_follow_the_layer_rule():
    violations = []
    for importer, target, _attr, line in internal_edges():
        if importer == FACADE or importer in ENTRY_POINTS:
            continue
        if target == FACADE:
            violations.append(f"{importer}:{line} imports the facade 'embedcache' (import the defining module)")
            continue
        source_unit, target_unit = unit(importer), unit(target)
        if source_unit == target_unit:
            continue
        if LAYER_OF[target_unit] > LAYER_OF[source_unit]:
            violations.append(f"{importer}:{line} imports {target} from a higher layer")
        elif LAYER_OF[target_unit] == LAYER_OF[source_unit]:
            violations.append(f"{importer}:{line} imports its peer {target}")
    assert not violations, "\n".join(violations)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in modules()}
    for importer, target, _attr, _line in internal_edges():
        if target in graph and target != importer:
            graph[importer].add(target)
    # A package's own __init__ is imported whenever a submodule is: count that edge too, except
    # from the package's own modules (Python imports the parent first; it is not a cycle).
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_names_cross_modules():
    crossing = [f"{importer}:{line} imports {target}.{attr}"
                for importer, target, attr, line in internal_edges()
                if attr is not None and attr.startswith("_") and target != importer]
    assert not crossing, "\n".join(crossing)


def test_walker_sees_function_level_imports_and_resolves_modules(tmp_path):
    # the rules above are only as good as the walker: check it on a known file
    probe_file = tmp_path / "x.py"
    probe_file.write_text("import os\n\ndef f():\n    from embedcache.store import reader\n    import embedcache.models.catalog\n")
    found = imports_of(probe_file, "embedcache.experiments.x")
    assert ("embedcache.store", "reader", 4) in found and ("embedcache.models.catalog", None, 5) in found


def _function_lengths(path: Path) -> list[tuple[str, int, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body_start = node.body[0].lineno
            if isinstance(node.body[0], ast.Expr) and isinstance(getattr(node.body[0], "value", None), ast.Constant):
                body_start = node.body[0].end_lineno + 1  # the docstring does not count
            out.append((node.name, node.lineno, node.end_lineno - body_start + 1))
    return out


def test_modules_and_functions_are_short():
    long_modules = [f"{name}: {len(p.read_text().splitlines())} lines" for name, p in modules().items()
                    if len(p.read_text().splitlines()) > MAX_MODULE_LINES]
    long_functions = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        for function, start, length in _function_lengths(path):
            reason = any("# long:" in line for line in lines[start - 1:start + 2])
            if length > MAX_FUNCTION_LINES and not reason:
                long_functions.append(f"{name}.{function} (line {start}): {length} lines")
    assert not long_modules and not long_functions, "\n".join(long_modules + long_functions)


def _run(code: str, env_extra: dict[str, str] | None = None, args: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(args or [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


def test_importing_the_package_and_the_cli_loads_neither_torch_nor_sklearn():
    result = _run("""
        import sys
        import embedcache, embedcache.cli
        heavy = sorted(m for m in ("torch", "torchvision", "sklearn", "h5py", "numpy") if m in sys.modules)
        print(heavy)
        assert embedcache.__version__
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_public_names_resolve_lazily():
    import embedcache

    assert "extract" in dir(embedcache) and set(embedcache.__all__) >= {"extract", "probe", "FeatureStore"}
    for name in embedcache.__all__:
        assert getattr(embedcache, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        embedcache.nope  # noqa: B018


@pytest.fixture
def no_torch(tmp_path):
    """A PYTHONPATH on which ``import torch`` (and scikit-learn) raises."""
    for name in ("torch", "sklearn"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} is not importable here')\n")
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}


def test_quick_commands_work_without_torch(no_torch, tmp_path):
    cache = tmp_path / "cache"
    _make_entry(cache)
    cli = [sys.executable, "-m", "embedcache"]
    for args in (["--help"], ["--version"], ["ls", "--cache-dir", str(cache)], ["info", "abcd", "--cache-dir", str(cache)],
                 ["extract", "--help"], ["rm", "abcd", "--yes", "--cache-dir", str(cache)]):
        result = _run("", no_torch, [*cli, *args])
        assert result.returncode == 0, (args, result.stderr)
    assert not list(cache.glob("*.h5"))
    broken = _run("import torch", no_torch)
    assert "not importable" in broken.stderr  # the fixture really hides torch


def _make_entry(cache: Path) -> None:
    """A small entry written with the store alone (no torch)."""
    from embedcache.store.writer import StoreWriter

    key = "abcd" + "0" * 60
    with StoreWriter(cache_dir=cache, cache_key=key, n=3, dim=2, store_dtype="float16",
                     attrs={"backbone": {"name": "x"}, "preprocess": {}, "precision": "fp32", "versions": {},
                            "source": {"description": "three rows"}, "class_names": ["a", "b"]},
                     paths=["p0", "p1", "p2"], labels=[0, 1, 0], splits=[0, 0, 2], file_sizes=[1, 1, 1],
                     file_mtimes_ns=[1, 1, 1]) as writer:
        import numpy as np

        writer.write_rows(np.arange(3), np.ones((3, 2), np.float32))
        writer.finalize()
