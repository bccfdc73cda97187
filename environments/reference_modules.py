"""Loading one self-contained module of a pinned wheel as a *reference* for conformance checks.

Conformance harnesses compare envtune's verdicts with a benchmark's own checker. When that checker is
a module that imports nothing of its package (BFCL's ``agentic_checker`` imports only ``re``), it is
extracted from the checksummed wheel into the asset folder and imported by path under a private
module name, so it can never shadow or be shadowed by an installed ``bfcl_eval``. A module that
imports its own package is refused: it would pull in whatever ``bfcl_eval`` is installed.

Used by conformance code and tests only; no episode runs reference code.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from types import ModuleType

from envtune.environments.assets import Asset, asset_dir, read_member


class ReferenceModuleError(RuntimeError):
    """The member is not a self-contained module."""


@functools.cache
def load_reference_module(asset: Asset, member: str, module_name: str) -> ModuleType:
    """Import ``member`` of ``asset`` as ``module_name`` (cached per process)."""
    source = read_member(asset, member)
    package = asset.distribution.replace("-", "_")
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else ["." * node.level]
        for name in names:
            if name.startswith(".") or name.split(".")[0] == package:
                raise ReferenceModuleError(f"{member} imports {name!r}: not self-contained")
    target = asset_dir() / f"reference-{asset.distribution}-{asset.version}" / member
    if not target.exists() or target.read_bytes() != source:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source)
    spec = importlib.util.spec_from_file_location(module_name, target)
    if spec is None or spec.loader is None:  # pragma: no cover - only for an unreadable path
        raise ReferenceModuleError(f"cannot load {target}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
