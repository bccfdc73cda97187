"""Turn-by-turn scoring against a cached ground-truth trace, with BFCL's semantics.

A turn with ground truth passes when the model made at least one call in it, every involved
instance's public state equals ground truth's after the turn, and ground truth's result strings of
the turn are contained (as a multiset) in all of the model's results so far. A turn whose ground
truth is empty passes only if the model answered without calling: a call, or a turn forced to end
by format errors, fails it (docs/method.md §3.3).

Ground truth is never executed here: the trace already holds each turn's state and results, and
it advances every turn whether or not the model acted (docs/method.md §8.3, §8.4).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from envtune.environments.ground_truth import GroundTruthTrace

_MISSING = object()


def state_equals(instance: Any, expected: Mapping[str, Any]) -> bool:
    """BFCL's ``_compare_instances``: every public attribute of ground truth equal on the model side."""
    return all(getattr(instance, name, _MISSING) == value for name, value in expected.items())


class TurnScorer:
    """Scores the turns of one episode; owns the model's cumulative results."""

    __slots__ = ("_instances", "_last_equal", "_results", "_touched", "_trace")

    def __init__(self, trace: GroundTruthTrace, instances: Mapping[str, Any]) -> None:
        self._trace = trace
        self._instances = instances
        self._results: Counter[str] = Counter()
        self._touched: set[str] = set()
        self._last_equal: dict[str, bool] = dict.fromkeys(instances, True)

    def record(self, class_name: str | None, result: str) -> None:
        """One call's result string; ``class_name`` is the instance it ran on (None if refused)."""
        self._results[result] += 1
        if class_name is not None:
            self._touched.add(class_name)

    def judge(self, turn: int, *, calls_in_turn: int, called_on_empty_turn: bool, forced: bool) -> bool:
        """Close ``turn`` and return its verdict (``forced``: the step limit ended it)."""
        truth = self._trace.turns[turn]
        states_equal = self._advance_equality(turn)
        if not truth.calls_expected:
            return not (called_on_empty_turn or forced) and calls_in_turn == 0
        if calls_in_turn == 0 or not states_equal:
            return False
        results = self._results
        return all(results[result] >= count for result, count in truth.needed)

    def _advance_equality(self, turn: int) -> bool:
        """Compare instances with the turn's ground-truth state, skipping provably equal ones.

        An instance the model did not touch this turn is unchanged; if it equalled ground truth
        after the previous turn and ground truth did not change it either, it is still equal.
        """
        truth = self._trace.turns[turn]
        touched = self._touched
        all_equal = True
        for class_name, instance in self._instances.items():
            if class_name not in touched and class_name not in truth.changed and self._last_equal[class_name]:
                continue
            equal = state_equals(instance, truth.states[class_name])
            self._last_equal[class_name] = equal
            all_equal = all_equal and equal
        self._touched = set()
        return all_equal
