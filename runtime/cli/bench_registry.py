"""The benchmark registry: what each benchmark declares, and finding them all.

Every script in ``benchmarks/`` (a file not starting with ``_``) declares itself with one module-level
``BENCHMARK = Benchmark(...)``: its quick and full command lines, the figures it reports (a key of
the one JSON line it prints last), each figure's baseline (a key of the same line, and which code
path it is), target and per-repeat samples, and its correctness checks (keys that must be true).
``envtune-bench`` runs whatever it finds; a script without a declaration is reported, never
skipped silently. A script that lacks a requirement (an extra environment, a GPU) exits with code 2
without printing its JSON line and says why on stderr: the run is reported as skipped.

Discovery reads the declaration from the source (``ast``) and evaluates only that expression with
these three names in scope: listing the benchmarks imports none of them (no torch, no data).
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
}


class DeclarationError(ValueError):
    """A benchmark's ``BENCHMARK`` declaration is missing or malformed."""


@dataclass(frozen=True, slots=True)
class Target:
    """A bar a figure must clear: ``value <op> bound``."""

    op: str
    bound: float

    @classmethod
    def parse(cls, text: str) -> Target:
        """``">= 1.5"`` -> Target(">=", 1.5)."""
        parts = text.split()
        if len(parts) != 2 or parts[0] not in _OPERATORS:
            raise DeclarationError(f"a target reads like '>= 1.5', got {text!r}")
        return cls(parts[0], float(parts[1]))

    def holds(self, value: float) -> bool:
        return _OPERATORS[self.op](value, self.bound)

    def __str__(self) -> str:
        return f"{self.op} {self.bound:g}"


@dataclass(frozen=True, slots=True)
class Figure:
    """One reported figure of a benchmark."""

    key: str
    """Key of the value in the benchmark's last JSON line (dots for nested objects)."""
    label: str
    """What it measures, in a few words."""
    unit: str = ""
    """Unit of the value (``us``, ``calls/s``, ``x``...)."""
    target: str | None = None
    """The bar, e.g. ``">= 1.5"`` (None: reported, not judged)."""
    samples: str | None = None
    """Key of the per-repeat values (median [min, max] in the table); None: one measurement."""
    baseline_key: str | None = None
    """Key of the baseline's value in the same JSON line (None: no baseline)."""
    baseline_label: str = ""
    """Which code path the baseline is (what a user would otherwise run)."""
    ratio: bool = False
    """True when the value already is a ratio against the baseline (not recomputed)."""

    def parsed_target(self) -> Target | None:
        return Target.parse(self.target) if self.target is not None else None


@dataclass(frozen=True, slots=True)
class Benchmark:
    """What one benchmark script declares (see the module docstring)."""

    name: str
    """Short name (the script's stem)."""
    summary: str
    """What it measures, in one line."""
    quick: tuple[str, ...] = ("--quick",)
    """Arguments of the quick run (CI-sized, the default of ``envtune-bench``)."""
    full: tuple[str, ...] = ()
    """Arguments of the full run."""
    figures: tuple[Figure, ...] = ()
    """The figures it reports."""
    checks: tuple[str, ...] = ()
    """JSON keys that must be true: correctness, never timings."""
    timeout_s: float = 1800.0
    """Wall-clock limit of one run (full mode; quick runs get a third)."""
    needs: tuple[str, ...] = ()
    """Optional requirements (``"gpu"``): the run is skipped, and says so, when they are missing."""

    def __post_init__(self) -> None:
        for figure in self.figures:
            figure.parsed_target()
        if len({f.key for f in self.figures}) != len(self.figures):
            raise DeclarationError(f"{self.name}: two figures with one key")


@dataclass(frozen=True, slots=True)
class Discovered:
    """A script in ``benchmarks/`` and its declaration (None, with ``error``, when it has none)."""

    path: Path
    benchmark: Benchmark | None
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def read_declaration(path: Path) -> Benchmark:
    """The ``BENCHMARK = Benchmark(...)`` of one script, evaluated without importing the script."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == "BENCHMARK"
        ):
            code = compile(ast.Expression(node.value), str(path), "eval")
            scope = {"__builtins__": {}, "Benchmark": Benchmark, "Figure": Figure}
            try:
                value = eval(code, scope)  # the repo's own declaration: literals and these names only
            except Exception as exc:
                raise DeclarationError(f"{path.name}: BENCHMARK does not evaluate: {exc}") from exc
            if not isinstance(value, Benchmark):
                raise DeclarationError(f"{path.name}: BENCHMARK is not a Benchmark")
            if value.name != path.stem:
                raise DeclarationError(f"{path.name}: BENCHMARK.name is {value.name!r}, not {path.stem!r}")
            return value
    raise DeclarationError(f"{path.name} declares no BENCHMARK = Benchmark(...)")


def discover(folder: Path) -> list[Discovered]:
    """Every benchmark script in ``folder`` (``*.py`` not starting with ``_``), sorted by name."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no benchmarks folder at {folder}")
    found = []
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            found.append(Discovered(path, read_declaration(path)))
        except (DeclarationError, SyntaxError) as exc:
            found.append(Discovered(path, None, str(exc)))
    return found


def lookup(payload: dict[str, Any], key: str) -> Any:
    """``payload["a"]["b"]`` for ``"a.b"``; None when absent."""
    value: Any = payload
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value
