"""The shape of the code base: no import cycles, and the installed package never imports research/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports() -> dict[str, set[str]]:
    """Module → the project modules it imports (lazy imports inside functions included)."""
    files = {
        ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f
        for top in ("alpha_tuner", "research")
        for f in (ROOT / top).rglob("*.py")
    }
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join([*parts, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                names = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[module].update(n for n in names if n in files and n != module)
    return graph


def test_no_module_imports_in_a_cycle() -> None:
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, dep])}"
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert "alpha_tuner.engine" in graph and "research.sweep" in graph  # the scan saw both trees


def test_the_package_imports_research_only_for_the_sweep_command() -> None:
    """The wheel has no research/; only ``alpha-tuner sweep`` (run from a clone) reaches into it."""
    leaks = {m: deps for m, deps in _imports().items() if m.startswith("alpha_tuner") and
             any(d.startswith("research") for d in deps)}  # fmt: skip
    assert set(leaks) == {"alpha_tuner.cli"}
    cli = (ROOT / "alpha_tuner" / "cli.py").read_text(encoding="utf-8")
    assert "\nfrom research" not in cli and "\nimport research" not in cli  # lazily, inside functions
