"""Ground truth executed once per task: per-turn state snapshots and result strings.

A rollout never re-executes ground truth (docs/method.md §8.3). The trace is computed by running the
task's ground-truth calls turn by turn on private instances, and it always advances every turn, so
a turn the model skips is still compared against the right state (docs/method.md §8.4).
"""

from __future__ import annotations

import copy
import functools
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from envtune.environments.instances import (
    Dispatcher,
    build_instances,
    method_parameter_names,
    public_methods,
    state_of,
)
from envtune.environments.tasks import Task
from envtune.environments.tool_calls import FormatError, parse_pythonic_calls
from envtune.environments.types import ToolCall


class GroundTruthError(RuntimeError):
    """A task's ground truth could not be parsed or executed."""


@dataclass(frozen=True, slots=True)
class TurnTruth:
    """What ground truth looks like at the end of one user turn."""

    calls_expected: bool
    """False for a turn whose ground truth is empty (the model must not call)."""
    results: tuple[str, ...]
    """BFCL result strings of this turn's ground-truth calls."""
    needed: tuple[tuple[str, int], ...]
    """``results`` as a multiset: (result, count) pairs the model's cumulative results must cover."""
    states: Mapping[str, Mapping[str, Any]]
    """Class name -> public attributes after the turn (deep copies, never mutated)."""
    changed: frozenset[str]
    """Classes whose state differs from the previous turn's (or the initial state)."""


@dataclass(frozen=True, slots=True)
class GroundTruthTrace:
    """Every turn's ground truth for one task."""

    task_id: str
    turns: tuple[TurnTruth, ...]


def positional_names_for(task: Task) -> Mapping[str, tuple[str, ...]]:
    """Function name -> parameter names, for every public method of the task's classes."""
    return _positional_names(task.involved_classes)


@functools.cache
def _positional_names(class_names: tuple[str, ...]) -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType(
        {
            method: method_parameter_names(class_name, method)
            for class_name in class_names
            for method in public_methods(class_name)
        }
    )


def compute_trace(task: Task) -> GroundTruthTrace:
    """Execute the task's ground truth once, snapshotting state and results after every turn."""
    instances = build_instances(task)
    dispatcher = Dispatcher(
        instances,
        {method: class_name for class_name in task.involved_classes for method in public_methods(class_name)},
    )
    positional = positional_names_for(task)
    previous = {name: copy.deepcopy(state_of(inst)) for name, inst in instances.items()}
    turns: list[TurnTruth] = []
    for turn_index, calls_text in enumerate(task.ground_truth):
        results: list[str] = []
        for text in calls_text:
            try:
                (call,) = parse_pythonic_calls(text, positional)
            except (FormatError, ValueError) as exc:
                raise GroundTruthError(
                    f"{task.id} turn {turn_index}: cannot parse GT call {text!r}: {exc}"
                ) from exc
            if call.name not in dispatcher:
                raise GroundTruthError(
                    f"{task.id} turn {turn_index}: GT calls unknown function {call.name!r}"
                )
            result, _ = dispatcher.call(call.name, call.arguments)
            results.append(result)
        states = {name: copy.deepcopy(state_of(inst)) for name, inst in instances.items()}
        changed = frozenset(name for name in states if states[name] != previous[name])
        turns.append(
            TurnTruth(
                calls_expected=bool(calls_text),
                results=tuple(results),
                needed=tuple(Counter(results).items()),
                states=states,
                changed=changed,
            )
        )
        previous = states
    return GroundTruthTrace(task_id=task.id, turns=tuple(turns))


class GroundTruthCache:
    """Traces computed on first use and kept per task (thread-safe; one per environment object)."""

    def __init__(self) -> None:
        self._traces: dict[str, GroundTruthTrace] = {}
        self._lock = threading.Lock()

    def get(self, task: Task) -> GroundTruthTrace:
        trace = self._traces.get(task.id)
        if trace is None:
            computed = compute_trace(task)
            with self._lock:
                trace = self._traces.setdefault(task.id, computed)
        return trace

    def __len__(self) -> int:
        return len(self._traces)


def ground_truth_calls(task: Task) -> list[list[ToolCall]]:
    """The task's ground truth as structured calls (positional arguments bound to names)."""
    positional = positional_names_for(task)
    return [
        [call for text in turn for call in parse_pythonic_calls(text, positional)]
        for turn in task.ground_truth
    ]
