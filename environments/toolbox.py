"""Whitelist dispatch of documented tools onto one object's methods (the newer suites' executor).

A ``ToolBox`` pairs a tool object (BFCL V4 memory or web search, an ACEBench scenario) with the
function docs the model sees. A call runs only if its name is one of those docs *and* a public method
of the object's class, after ``schemas.validate_call`` accepted its arguments; the method is looked
up by name, never evaluated. Results are rendered as BFCL's executor renders them (strings as they
are, dicts as JSON, anything else with ``str``), an exception or a refusal becomes an
``Error during execution: …`` result, and a returned ``{"error": …}`` counts as a failed call.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from envtune.environments.instances import ERROR_PREFIX, is_error_result, result_to_string
from envtune.environments.schemas import validate_call
from envtune.environments.types import FunctionDoc, ToolCall


@dataclass(frozen=True, slots=True)
class ToolResult:
    """One executed (or refused) call."""

    executed: bool
    """True when a method ran."""
    ok: bool
    """Ran and returned no error."""
    result: str
    """The rendered result the model sees."""
    hint: str | None = None
    """The schema hint of a refused call (for augmented feedback)."""


def public_method_names(cls: type) -> frozenset[str]:
    """Public functions defined on a class (or its bases): what may ever be dispatched."""
    return frozenset(
        name for name, member in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")
    )


class ToolBox:
    """The documented, public methods of one tool object."""

    __slots__ = ("_docs", "_target")

    def __init__(self, target: object, docs: Sequence[FunctionDoc]) -> None:
        methods = public_method_names(type(target))
        missing = [doc.name for doc in docs if doc.name not in methods]
        if missing:
            raise ValueError(f"{type(target).__name__} has no public method for documented tools {missing}")
        self._target = target
        self._docs: Mapping[str, FunctionDoc] = MappingProxyType({doc.name: doc for doc in docs})

    @property
    def docs(self) -> Mapping[str, FunctionDoc]:
        return self._docs

    def call(self, call: ToolCall) -> ToolResult:
        issue = validate_call(call, self._docs)
        if issue is not None:
            return ToolResult(
                executed=False, ok=False, result=f"{ERROR_PREFIX}{issue.message}", hint=issue.hint
            )
        method = getattr(self._target, call.name)
        try:
            value: Any = method(**call.arguments)
        except Exception as exc:  # a tool's failure is an observation, never a crash
            return ToolResult(executed=True, ok=False, result=f"{ERROR_PREFIX}{exc}")
        return ToolResult(executed=True, ok=not is_error_result(value), result=result_to_string(value))
