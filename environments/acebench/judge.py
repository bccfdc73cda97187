"""ACEBench's agent verdicts, computed by envtune: end-state accuracy and process accuracy.

End state (ACEBench's ``agent_eval`` with its ``agent_checker``): the run's result is the list of
``{ClassName: {attribute: value}}`` of the involved classes (their compared attributes, through JSON),
present only if at least one tool step ran without an exception. It must have as many entries as the
ground truth; for each ground-truth entry, the first result entry with the same class passes the
checker: every result attribute must be in the ground truth, a dict-valued ground-truth attribute must
have each of its keys equal in the result (extra keys in the result are not checked), any other value
must be equal. (An entry without a matching class leaves the previous entry's verdict standing, as in
ACEBench.)

Process (``agent_eval_process``): 1.0 for a passed task; otherwise the share of milestone calls found
in order (as a subsequence, by exact text) among the calls the agent sent; with alternative milestone
lists, the best share rounded to three decimals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class EndStateVerdict:
    passed: bool
    errors: tuple[str, ...]


def class_check(model: Mapping[str, Any], expected: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """One class's attributes against the ground truth (ACEBench's ``agent_checker``)."""
    scenario = next(iter(expected))
    wanted = next(iter(expected.values()))
    got = next(iter(model.values()))
    errors = []
    for attribute, value in got.items():
        if attribute not in wanted:
            errors.append(f"class({scenario}) attributes({attribute}) missing in possible_answer.")
            continue
        target = wanted[attribute]
        if isinstance(target, dict):
            for key, item in target.items():
                if key not in value:
                    errors.append(f"class({scenario}) attributes({attribute}) wrong")
                elif item != value[key]:
                    errors.append(f"class({scenario}) attributes({attribute}.{key}) wrong")
        elif target != value:
            errors.append(f"class({scenario}) attributes({attribute}) wrong")
    return not errors, errors


def end_state(
    result: Sequence[Mapping[str, Any]], ground_truth: Sequence[Mapping[str, Any]]
) -> EndStateVerdict:
    if len(result) != len(ground_truth):
        return EndStateVerdict(False, ("wrong number of class",))
    passed = True
    errors: list[str] = []
    last_ok = True
    for expected in ground_truth:
        match = next((item for item in result if set(item) == set(expected)), None)
        if match is not None:
            last_ok, found = class_check(match, expected)
            errors += found
        if not last_ok:
            passed = False
    return EndStateVerdict(passed, tuple(errors))


def _in_order(calls: Sequence[str], milestones: Sequence[str]) -> float:
    if not milestones:
        return 1.0
    found = 0
    position = 0
    for stone in milestones:
        while position < len(calls):
            position += 1
            if calls[position - 1].strip() == stone.strip():
                found += 1
                break
    return found / len(milestones)


def process_accuracy(passed: bool, calls: Sequence[str], alternatives: Sequence[Sequence[str]]) -> float:
    if passed:
        return 1.0
    if len(alternatives) == 1:  # ACEBench sums the unrounded share for a single milestone list
        return _in_order(calls, alternatives[0])
    return max(round(_in_order(calls, alternative), 3) for alternative in alternatives)
