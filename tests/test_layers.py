"""raydiff's modules are layered: no import circles; every import of a raydiff module sits at module top, except the
deferred ones listed in DEFERRED with why; the light modules import nothing heavy.

Read from the source with `ast` (nothing is executed), so every module is seen, in well under a second.
"""

from __future__ import annotations

import ast
import functools
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raydiff"

# (module, raydiff module it imports inside a function): why. Nothing else may be deferred.
DEFERRED = {
    ("raydiff.train.entry", "raydiff.train.loop"):
        "the Train controller unpickles the training function; the loop would import torch, DeepSpeed and diffusers",
    ("raydiff.data.precompute", "raydiff.models"):
        "torch and diffusers in the encoder actors only: Ray Data's cache-read tasks import precompute",
    ("raydiff.hub", "raydiff.models"):
        "building the tiny model needs torch and diffusers; hub stays light for Ray Data preprocessing tasks",
    ("raydiff.train.summary", "raydiff.generate"):
        "diffusers for the end-of-run sample grid only: the driver imports summary, seconds of every run's start-up",
    ("raydiff.train.summary", "raydiff.validation"): "image_grid, beside generate",
}

HEAVY = {"torch", "diffusers", "transformers", "deepspeed"}
# Module -> third-party packages it must not import, directly or through the raydiff modules it imports.
LIGHT = {
    "raydiff.config": {"torch", "ray", *HEAVY},  # every process reads the config, the Tune driver included
    "raydiff.compat": {"ray", *HEAVY},  # imported by the console, before Ray
    "raydiff.console": {"ray", *HEAVY},  # configures Ray's logging before Ray is imported
    "raydiff.tokens": {"torch", "diffusers", "deepspeed"},  # Ray Data preprocessing tasks
    "raydiff.data.pipeline": HEAVY,  # Ray Data preprocessing tasks
    "raydiff.data.precompute": HEAVY,  # Ray Data cache-read tasks
    "raydiff.train.entry": {"ray", *HEAVY},  # the Train controller
    "raydiff.train.tracking": HEAVY,  # the Train controller (RunTracker)
    # The driver: torch comes with Ray Train's TorchTrainer; diffusers and transformers cost seconds of every run's
    # start-up (and of every Tune driver's) and the driver builds no model (unless it builds the tiny one once).
    "raydiff.train.driver": {"diffusers", "transformers", "deepspeed"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The modules an import statement loads (``from pkg import name``: ``pkg.name`` when that is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        package = module if MODULES.get(module, Path()).name == "__init__.py" else module.rpartition(".")[0]
        package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        base = f"{package}.{base}" if base else package
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


@functools.cache
def _imports(module: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(modules imported when ``module`` is imported, [(module imported inside a function, line)])."""
    top, deferred = [], []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(child, module):
                    (deferred.append((target, child.lineno)) if in_function else top.append(target))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(MODULES[module].read_text(), str(MODULES[module])), False)
    return top, deferred


def _own(target: str) -> bool:
    return target == "raydiff" or target.startswith("raydiff.")


def _graph() -> dict[str, set[str]]:
    """raydiff module -> the raydiff modules importing it runs (a submodule's packages included)."""
    graph = {}
    for module in MODULES:
        edges = set()
        for target in filter(_own, _imports(module)[0]):
            parts = target.split(".")
            edges |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} - _ancestors(module)
        graph[module] = edges & set(MODULES) - {module}
    return graph


def _ancestors(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the path that closes it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _third_party_reached(module: str) -> dict[str, str]:
    """{third-party top-level package: the raydiff module that imports it} over everything importing ``module`` runs."""
    graph, seen, todo, found = _graph(), set(), [module], {}
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo += graph[current]
        for target in _imports(current)[0]:
            if not _own(target):
                found.setdefault(target.split(".")[0], current)
    return found


def test_no_import_circles() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_raydiff_modules_are_imported_at_module_top_except_the_listed_deferrals() -> None:
    deferred = {(m, t): line for m in MODULES for t, line in _imports(m)[1] if _own(t)}
    unlisted = [f"{MODULES[m].relative_to(PACKAGE.parent)}:{line} imports {t} in a function"
                for (m, t), line in sorted(deferred.items()) if (m, t) not in DEFERRED]
    assert not unlisted, "move to module top, or list in DEFERRED with why:\n" + "\n".join(unlisted)
    assert set(DEFERRED) <= set(deferred), f"stale DEFERRED entries: {set(DEFERRED) - set(deferred)}"


@pytest.mark.parametrize("module", sorted(LIGHT))
def test_light_modules_import_nothing_heavy(module: str) -> None:
    reached = _third_party_reached(module)
    heavy = {package: by for package, by in reached.items() if package in LIGHT[module]}
    assert not heavy, f"importing {module} imports {heavy} (package: raydiff module importing it at its top)"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)


def test_the_checks_see_a_circle_and_a_deferred_import() -> None:
    """The graph code finds what it must: a circle, a function-level import, a package's submodule."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    top, deferred = _imports("raydiff.train.entry")
    assert top == [] and [target for target, _ in deferred] == ["raydiff.train.loop"]
    assert "raydiff.data.pipeline" in _imports("raydiff.data.precompute")[0]
    assert _third_party_reached("raydiff.models").get("torch") == "raydiff.models"
