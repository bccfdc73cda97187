"""The BFCL tool instances of one episode, and safe dispatch to their methods.

Each episode owns fresh instances of BFCL's own classes, built from the task's initial config (no
module globals, nothing shared between episodes). A call reaches a method only through a whitelist
of the visible, public methods of those instances: a name is looked up, never evaluated.
Result strings follow BFCL's executor exactly, so BFCL's response checker semantics carry over.

Whatever a method does, ``Dispatcher.dispatch`` answers with a result string: a call that would work
without bound is refused first (``limits.py``), an exception (from the method or from rendering its
value) becomes BFCL's ``Error during execution: ...`` text, a call still running at the step's deadline
is interrupted (``deadline.py``), and an over-long result is cut. Only ``KeyboardInterrupt`` and
``SystemExit`` pass through.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from envtune.environments.deadline import StepTimeLimitExceeded, Watchdog
from envtune.environments.limits import (
    MAX_RESULT_CHARS,
    NUMERIC_STATE_CLASSES,
    check_call,
    cut_result,
    is_encodable,
    restore_numeric_state,
    save_numeric_state,
)
from envtune.environments.tasks import Task
from envtune.environments.types import ToolFault

CLASS_MODULES: Mapping[str, str] = {
    "GorillaFileSystem": "gorilla_file_system",
    "MathAPI": "math_api",
    "MessageAPI": "message_api",
    "TwitterAPI": "posting_api",
    "TicketAPI": "ticket_api",
    "TradingBot": "trading_bot",
    "TravelAPI": "travel_booking",
    "VehicleControlAPI": "vehicle_control",
}
"""BFCL class -> its module under ``bfcl_eval.eval_checker.multi_turn_eval.func_source_code``."""

STATELESS_CLASSES = frozenset({"MathAPI"})
"""Classes BFCL builds without a scenario (as in its ``multi_turn_utils``)."""

ERROR_PREFIX = "Error during execution: "
"""BFCL's prefix for a call that raised; envtune uses it for refused calls too."""


@functools.cache
def bfcl_class(class_name: str) -> type:
    """BFCL's class by name (imported from the installed package, never copied)."""
    if class_name not in CLASS_MODULES:
        raise KeyError(f"unknown BFCL class {class_name!r}")
    module = importlib.import_module(
        f"bfcl_eval.eval_checker.multi_turn_eval.func_source_code.{CLASS_MODULES[class_name]}"
    )
    cls: type = getattr(module, class_name)
    return cls


@functools.cache
def public_methods(class_name: str) -> frozenset[str]:
    """Names of the public methods a model may call on a class (never dunder or private)."""
    cls = bfcl_class(class_name)
    return frozenset(
        name for name, member in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")
    )


@functools.cache
def method_parameter_names(class_name: str, method_name: str) -> tuple[str, ...]:
    """A method's parameter names in order (to bind BFCL's positional ground-truth arguments)."""
    if method_name not in public_methods(class_name):
        raise KeyError(f"{class_name} has no public method {method_name!r}")
    signature = inspect.signature(getattr(bfcl_class(class_name), method_name))
    return tuple(name for name in signature.parameters if name != "self")


def build_instances(task: Task) -> dict[str, Any]:
    """Fresh instances of the task's classes, loaded from a private copy of its initial config."""
    instances: dict[str, Any] = {}
    for class_name in task.involved_classes:
        instance = bfcl_class(class_name)()
        if class_name not in STATELESS_CLASSES:
            instance._load_scenario(task.fresh_config(class_name), long_context=task.long_context)
        instances[class_name] = instance
    return instances


def result_to_string(value: Any) -> str:
    """BFCL's string form of a returned value (``multi_turn_utils.execute_multi_turn_func_call``).

    May raise, as BFCL's does (an ``int`` of more than 4,300 digits has no ``str``); ``dispatch`` runs
    it inside the same ``try`` as the call, where BFCL has it too.
    """
    if type(value) is str:
        return value
    if type(value) is dict:
        try:
            return json.dumps(value)
        except Exception:  # BFCL: a bare except, then str()
            return str(value)
    return str(value)


def exception_text(exc: BaseException) -> str:
    """BFCL's ``Error during execution: {e}``; an exception whose ``str`` fails is named by its type."""
    try:
        message = str(exc)
    except Exception:
        message = f"{type(exc).__name__} (its message could not be rendered)"
    return f"{ERROR_PREFIX}{message}"


def is_error_result(value: Any) -> bool:
    """A returned ``{"error": ...}`` dict is a failed call, not a correct one (docs/method.md §8.8)."""
    return isinstance(value, dict) and "error" in value


def state_of(instance: Any) -> dict[str, Any]:
    """The public attributes BFCL's state checker compares (``vars`` minus ``_``-prefixed names)."""
    return {name: value for name, value in vars(instance).items() if not name.startswith("_")}


Dispatched = tuple[str, bool, bool, ToolFault | None]
"""What one dispatched call came to: (result, ok, executed, fault). ``result`` is the string shown to
the model and scored; ``ok``: it ran and returned no error; ``executed``: the method was entered
(False when a bound or the deadline refused it first); ``fault``: set when the environment shaped
the result (``ToolFault``). A plain tuple: one is made per tool call, on the step's hot path."""


class Dispatcher:
    """Maps visible function names to methods of one episode's instances (a whitelist)."""

    __slots__ = ("_classes", "_instances", "_watchdog")

    def __init__(
        self, instances: Mapping[str, Any], visible: Mapping[str, str], watchdog: Watchdog | None = None
    ) -> None:
        """``visible``: function name -> class name; shared read-only, copied only when extended.

        ``watchdog`` enforces ``dispatch``'s ``deadline`` (without one, a deadline only refuses calls
        that would start after it).
        """
        self._instances = instances
        self._classes = visible
        self._watchdog = watchdog
        for function_name, class_name in visible.items():
            self._check(function_name, class_name)

    def _check(self, function_name: str, class_name: str) -> None:
        if class_name not in self._instances:
            raise KeyError(f"class {class_name!r} is not part of this episode")
        if function_name not in public_methods(class_name):
            raise KeyError(f"{class_name} has no public method {function_name!r}")

    def allow(self, function_name: str, class_name: str) -> None:
        """Make a documented public method callable (used when a missed function is revealed)."""
        self._check(function_name, class_name)
        self._classes = {**self._classes, function_name: class_name}

    def __contains__(self, function_name: str) -> bool:
        return function_name in self._classes

    def class_of(self, function_name: str) -> str:
        return self._classes[function_name]

    def call(self, function_name: str, arguments: Mapping[str, Any]) -> tuple[str, bool]:
        """Run a whitelisted method; returns (BFCL result string, ok). Never raises for the tool."""
        result, ok, _, _ = self.dispatch(function_name, arguments)
        return result, ok

    def dispatch(
        self, function_name: str, arguments: Mapping[str, Any], *, deadline: float | None = None
    ) -> Dispatched:
        """Bound, run and render one whitelisted call; ``deadline`` is on ``time.monotonic``'s clock."""
        if deadline is not None and time.monotonic() >= deadline:
            return (
                f"{ERROR_PREFIX}{function_name}() was not run: the step reached its time limit",
                False,
                False,
                ToolFault.TIME_LIMIT,
            )
        class_name = self._classes[function_name]
        instance = self._instances[class_name]
        refusal = check_call(class_name, function_name, instance, arguments)
        if refusal is not None:
            return f"{ERROR_PREFIX}{refusal}", False, False, ToolFault.LIMIT
        method: Callable[..., Any] = getattr(instance, function_name)
        saved = save_numeric_state() if class_name in NUMERIC_STATE_CLASSES else None
        watchdog = self._watchdog if deadline is not None else None
        returned = False
        token = None
        try:
            try:
                try:
                    # The watchdog's window holds nothing but BFCL's code and BFCL's rendering (which
                    # must see the precision the call set: an mpf renders at the current precision).
                    if watchdog is not None:
                        token = watchdog.arm(deadline)  # type: ignore[arg-type]
                    value = method(**arguments)
                    returned = True
                    text = result_to_string(value)
                    ok = not is_error_result(value)
                finally:
                    if token is not None:
                        watchdog.disarm(token)  # type: ignore[union-attr]
            finally:
                if saved is not None:
                    restore_numeric_state(saved)
        except StepTimeLimitExceeded:
            return (
                f"{ERROR_PREFIX}{function_name}() was stopped: the step reached its time limit",
                False,
                True,
                ToolFault.TIME_LIMIT,
            )
        except Exception as exc:  # a tool's failure is an observation, never a crash
            text, ok = exception_text(exc), False
            fault: ToolFault | None = ToolFault.UNSERIALISABLE if returned else ToolFault.RAISED
        else:
            fault = None
            if not is_encodable(text):
                text, ok = f"{ERROR_PREFIX}{function_name}() returned text that is not valid unicode", False
                fault = ToolFault.UNSERIALISABLE
        if len(text) > MAX_RESULT_CHARS:  # an exception's message can be as long as the arguments it quotes
            return cut_result(text), ok, True, fault or ToolFault.TRUNCATED  # type: ignore[return-value]
        return text, ok, True, fault
