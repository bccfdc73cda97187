"""Tripwires: count (and refuse) any execution outside the visible BFCL methods while a step runs.

Every method of the eight BFCL classes is wrapped: an entry into one from envtune's dispatcher must
name a function visible in the episode (entries from ``feedback.py`` are the augmented hints'
read-only lookups, counted apart; BFCL calling its own methods is not an entry). ``open``, ``eval``,
``exec``, ``compile`` (except to an AST, which ``ast.parse`` needs), imports of modules not loaded at
install time, ``os.system``/``popen``/``exec*``/``spawn*``/``fork``/file-system changes,
``subprocess``, ``socket`` and ``shutil`` are replaced by functions that count and raise.

A harness for ``fuzzing.py`` and tests, never imported by the product. Installing patches process-wide
names until ``uninstall``; run nothing else in the process meanwhile.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import io
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from envtune.environments.instances import CLASS_MODULES, bfcl_class

MAX_EXAMPLES = 10
"""How many escapes are quoted."""

_BFCL_MODULE_PREFIX = "bfcl_eval."
_DISPATCH_MODULE = "envtune.environments.instances"
_HINT_MODULE = "envtune.environments.feedback"


class TripwireError(PermissionError):
    """Raised by a tripwire instead of doing what was asked."""


@dataclass
class Tripwires:
    """Counts (and refuses) execution outside the visible BFCL methods while ``active``."""

    active: bool = False
    """Only calls made while a step runs count; the harness itself may open files or import."""
    visible: frozenset[str] = frozenset()
    """The functions the current episode may call (set before each step)."""
    escapes: int = 0
    hint_lookups: int = 0
    """Entries into BFCL methods from the augmented hints (read-only lookups; not escapes)."""
    examples: list[str] = field(default_factory=list)
    _undo: list[tuple[Any, str, Any]] = field(default_factory=list)
    _loaded: frozenset[str] = frozenset()

    def _escape(self, what: str) -> None:
        self.escapes += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(what)

    def _patch(self, owner: Any, name: str, replacement: Any) -> None:
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    def install(self) -> None:
        """Wrap the BFCL classes' methods and replace the dangerous process-level functions."""
        if self._undo:
            raise RuntimeError("tripwires are already installed")
        self._loaded = frozenset(sys.modules)
        for class_name in CLASS_MODULES:
            cls = bfcl_class(class_name)
            for name, member in list(vars(cls).items()):
                if callable(member) and not isinstance(member, type):
                    self._patch(cls, name, self._watch_method(name, member))
        for owner, name in _FORBIDDEN:
            if hasattr(owner, name):
                what = f"{getattr(owner, '__name__', owner)}.{name}"
                self._patch(owner, name, self._forbid(what, getattr(owner, name)))
        original_compile = builtins.compile
        original_import = builtins.__import__
        original_import_module = importlib.import_module

        def compile_ast_only(
            source: Any, filename: Any, mode: Any, flags: int = 0, *args: Any, **kw: Any
        ) -> Any:
            if self.active and not flags & 0x400:  # ast.PyCF_ONLY_AST: parsing is fine, code objects are not
                self._escape(f"compile({str(source)[:60]!r})")
                raise TripwireError("compile is forbidden during a step")
            return original_compile(source, filename, mode, flags, *args, **kw)

        def guarded_import(
            name: str, globals_: Any = None, locals_: Any = None, fromlist: Any = (), level: int = 0
        ) -> Any:
            if self.active and level == 0 and name not in self._loaded:
                self._escape(f"import {name}")
                raise TripwireError(f"importing {name} is forbidden during a step")
            return original_import(name, globals_, locals_, fromlist, level)

        def guarded_import_module(name: str, package: str | None = None) -> Any:
            if self.active and name not in self._loaded:
                self._escape(f"importlib.import_module({name!r})")
                raise TripwireError(f"importing {name} is forbidden during a step")
            return original_import_module(name, package)

        self._patch(builtins, "compile", compile_ast_only)
        self._patch(builtins, "__import__", guarded_import)
        self._patch(importlib, "import_module", guarded_import_module)

    def uninstall(self) -> None:
        while self._undo:
            owner, name, original = self._undo.pop()
            setattr(owner, name, original)

    def _forbid(self, what: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def forbidden(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                self._escape(f"{what}({str(args)[:60]})")
                raise TripwireError(f"{what} is forbidden during a step")
            return original(*args, **kwargs)

        return forbidden

    def begin_step(self, visible: frozenset[str]) -> None:
        """Arm the tripwires for one step of an episode whose callable functions are ``visible``."""
        if len(sys.modules) != len(self._loaded):  # the harness itself may import between steps
            self._loaded = frozenset(sys.modules)
        self.visible = visible
        self.active = True

    def end_step(self) -> None:
        """Disarm; a module that appeared during the step (however it was imported) is an escape."""
        self.active = False
        if len(sys.modules) != len(self._loaded):
            for name in sorted(set(sys.modules) - self._loaded):
                self._escape(f"module {name} was imported during a step")
            self._loaded = frozenset(sys.modules)

    def _watch_method(self, name: str, method: Any) -> Any:
        if isinstance(method, staticmethod | classmethod):
            return method  # BFCL's classes define none; nothing to enter through an instance

        @functools.wraps(method)
        def watched(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                caller = sys._getframe(1).f_globals.get("__name__", "")
                if not caller.startswith(_BFCL_MODULE_PREFIX):  # BFCL calling itself is not an entry
                    if caller == _HINT_MODULE:
                        self.hint_lookups += 1
                    elif caller != _DISPATCH_MODULE or name not in self.visible:
                        self._escape(f"{name} entered from {caller or '?'}")
            return method(*args, **kwargs)

        return watched


_FORBIDDEN: tuple[tuple[Any, str], ...] = (
    (builtins, "open"),
    (io, "open"),
    (builtins, "eval"),
    (builtins, "exec"),
    (builtins, "breakpoint"),
    (builtins, "input"),
    *(
        (os, name)
        for name in (
            "open", "system", "popen", "fork", "forkpty", "kill", "killpg", "remove", "unlink", "rmdir",
            "mkdir", "makedirs", "rename", "renames", "replace", "chmod", "chown", "chdir", "truncate",
            "symlink", "link", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp",
            "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp",
            "spawnvpe", "posix_spawn", "posix_spawnp", "putenv", "unsetenv",
        )
    ),
    (subprocess, "Popen"),
    (subprocess, "run"),
    (subprocess, "call"),
    (subprocess, "check_call"),
    (subprocess, "check_output"),
    (subprocess, "getoutput"),
    (subprocess, "getstatusoutput"),
    (socket, "socket"),
    (socket, "create_connection"),
    (shutil, "rmtree"),
    (shutil, "move"),
    (shutil, "copy"),
    (shutil, "copy2"),
    (shutil, "copyfile"),
    (shutil, "copytree"),
)  # fmt: skip
