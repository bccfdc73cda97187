"""The floor plan holds: imports flow one way, there is no cycle, and the core needs no heavy package.

The import graph is read from the source (``ast``), imports inside functions included, so a lazy
import that runs against the stack fails here as surely as a top-level one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"environments": "envtune.environments", "agents": "envtune.agents", "optim": "envtune.optim"}
RUNTIME_SUBPACKAGES = ("engines", "recipe", "cli", "testing")

# Layer of each module group -> the groups it may import (itself included).
ALLOWED: dict[str, set[str]] = {
    "environments": {"environments"},
    "agents": {"agents", "environments"},
    "optim": {"optim"},
    "runtime": {"runtime", "agents", "environments"},
    "runtime.testing": {"runtime.testing", "runtime", "agents", "environments"},
    "runtime.engines": {"runtime.engines", "runtime", "agents", "environments"},
    "runtime.recipe": {"runtime.recipe", "runtime.engines", "runtime", "agents", "environments", "optim"},
}
ALLOWED["runtime.cli"] = {"runtime.cli", *ALLOWED["runtime.recipe"]}
HEAVY = ("torch", "transformers", "peft", "xgrammar", "aiohttp")


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the library."""
    out: dict[str, Path] = {}
    for folder, package in [*PACKAGES.items(), ("runtime", "envtune.runtime")]:
        for path in sorted((REPO / folder).rglob("*.py")):
            relative = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def group_of(module: str) -> str:
    parts = module.split(".")
    if parts[1] == "runtime" and len(parts) > 2 and parts[2] in RUNTIME_SUBPACKAGES:
        return f"runtime.{parts[2]}"
    return parts[1]


def imports_of(module: str, path: Path) -> set[str]:
    """envtune modules imported anywhere in the file (relative imports resolved), except under
    ``if TYPE_CHECKING:`` (annotations only: never executed, so neither a cycle nor a dependency)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(inner) for child in node.body for inner in ast.walk(child))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("envtune."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                target = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.startswith("envtune."):
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
    known = module_files()
    return {name for name in found if name in known and name != module}


def test_every_import_follows_the_stack() -> None:
    wrong = []
    for module, path in module_files().items():
        group = group_of(module)
        for target in imports_of(module, path):
            if group_of(target) not in ALLOWED[group]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_there_is_no_import_cycle() -> None:
    files = module_files()
    graph = {module: imports_of(module, path) for module, path in files.items()}
    # A package imports its own face's submodules; the face itself is not an edge back.
    for module, targets in graph.items():
        targets.discard(module.rsplit(".", 1)[0])
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target] if target in stack else [node, target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_package_face_is_lazy() -> None:
    for module, path in module_files().items():
        if path.name == "__init__.py":
            tree = ast.parse(path.read_text(encoding="utf-8"))
            names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            assert "__getattr__" not in names, module


BLOCKER = textwrap.dedent(
    f"""
    import importlib.abc, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {HEAVY!r}:
                raise ImportError(f"{{name}} is blocked: the core must not need it")
            return None

    sys.meta_path.insert(0, Blocker())
    """
)


def run_blocked(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def test_the_core_imports_with_heavy_packages_unimportable() -> None:
    core = [m for m in module_files() if group_of(m) in ("environments", "agents", "runtime")]
    core += [f"envtune.optim.{m}" for m in ("config", "advantages")] + ["envtune.optim"]
    core += [f"envtune.runtime.engines.{m}" for m in ("settings", "sglang_protocol")]
    recipe = ("config", "config_io", "curriculum", "episodes", "evaluation")
    core += [f"envtune.runtime.recipe.{m}" for m in recipe]
    core += ["envtune.runtime.engines", "envtune.runtime.cli.run"]
    done = run_blocked(
        f"""
        import importlib
        for name in {sorted(core)!r}:
            importlib.import_module(name)
        assert not any(m.split(".")[0] in {HEAVY!r} for m in sys.modules), sorted(sys.modules)
        print("ok", len({sorted(core)!r}))
        """
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")


@pytest.mark.parametrize("flag", ["--help", "--list-keys"])
def test_run_help_and_list_keys_load_no_torch(flag: str) -> None:
    done = run_blocked(
        f"""
        from envtune.runtime.cli.run import main
        try:
            main([{flag!r}])
        except SystemExit as exit:
            assert exit.code in (0, None), exit.code
        """
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "curriculum" in done.stdout or "envtune-run" in done.stdout
