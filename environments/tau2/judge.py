"""τ²-bench's reward, computed by envtune from a finished conversation.

The rules are tau2's (``evaluate_simulation`` with ``EvaluationType.ALL``): a conversation that did
not end with the agent's or the user's stop gets 0; a task without criteria gets 1; otherwise the
reward is the product of the components in the task's ``reward_basis``:

- ``DB``: the final agent (and user) databases equal those reached by replaying the gold actions
  from the same initial state (compared by hash; both hashes come from the tool worker);
- ``ENV_ASSERTION``: every env assertion, run on the final environment, returns its expected value;
- ``ACTION``: every gold action matches some tool call of the conversation (agent's or user's) on
  name and the compared arguments;
- ``COMMUNICATE``: every piece of ``communicate_info`` occurs, case-insensitively, in some assistant
  text message with its commas removed;
- ``NL_ASSERTION``: only with a judge endpoint (``nl_judge.py``); without one such a task cannot be
  scored and the verdict says so.

The function here is pure: the environment facts (hashes, assertion results) are inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from envtune.environments.suite_api import TaskVerdict
from envtune.environments.tau2.data import Action, Tau2Task

STOP_REASONS = frozenset({"agent_stop", "user_stop"})
"""Termination reasons that get a reward (tau2's ``AGENT_STOP``, ``USER_STOP``)."""
SUCCESS_TOLERANCE = 1e-6
"""tau2 counts a reward within this of 1 as a success (pass^k)."""


@dataclass(frozen=True, slots=True)
class EnvFacts:
    """What the tool worker measured on the final and the gold environments."""

    predicted_hashes: tuple[str | None, str | None]
    """(agent DB, user DB) hashes after the conversation."""
    gold_hashes: tuple[str | None, str | None]
    """The same after replaying the gold actions."""
    assertions: tuple[bool, ...]
    """Each env assertion's raw result on the final environment (before comparing to its expected value)."""


@dataclass(frozen=True, slots=True)
class NlResult:
    """The NL-assertion judge's findings (only when a judge endpoint is configured)."""

    met: tuple[bool, ...]
    judge: str
    """Which endpoint and model judged (said in the output)."""


def predicted_tool_calls(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Every tool call of assistant and user messages, in order."""
    calls: list[Mapping[str, Any]] = []
    for message in messages:
        if message.get("role") in ("assistant", "user") and message.get("tool_calls"):
            calls.extend(message["tool_calls"])
    return calls


def action_matches(action: Action, call: Mapping[str, Any]) -> bool:
    """tau2's ``Action.compare_with_tool_call``."""
    if action.name != call.get("name"):
        return False
    arguments: Mapping[str, Any] = call.get("arguments") or {}
    compared = action.compare_args if action.compare_args is not None else tuple(arguments)
    if not compared:
        return True
    wanted = set(compared)
    return {k: v for k, v in arguments.items() if k in wanted} == {
        k: _plain(v) for k, v in action.arguments.items() if k in wanted
    }


def _plain(value: Any) -> Any:
    """Gold arguments are frozen (mapping proxies, tuples); compare them as JSON values."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def communicated(info: str, messages: Sequence[Mapping[str, Any]]) -> bool:
    needle = info.lower()
    for message in messages:
        content = message.get("content")
        if message.get("role") == "assistant" and content and needle in content.lower().replace(",", ""):
            return True
    return False


def judge(
    task: Tau2Task,
    messages: Sequence[Mapping[str, Any]],
    termination_reason: str,
    facts: EnvFacts | None,
    nl: NlResult | None = None,
    *,
    suite: str,
) -> TaskVerdict:
    """The verdict on one conversation (``facts`` may be None only if no env component is needed)."""

    def verdict(reward: float, **detail: Any) -> TaskVerdict:
        passed = abs(reward - 1.0) <= SUCCESS_TOLERANCE
        return TaskVerdict(
            task_id=task.id,
            suite=suite,
            category=task.domain,
            passed=passed,
            reward=reward,
            detail={"termination_reason": termination_reason, **detail},
        )

    if termination_reason not in STOP_REASONS:
        return verdict(0.0, note=f"terminated prematurely: {termination_reason}")
    if not task.has_criteria:
        return verdict(1.0, note="no evaluation criteria")
    basis = set(task.reward_basis)
    reward = 1.0
    breakdown: dict[str, float] = {}
    detail: dict[str, Any] = {"reward_basis": list(task.reward_basis)}

    if basis & {"DB", "ENV_ASSERTION"}:
        if facts is None:
            raise ValueError(
                f"task {task.id} needs environment facts for {sorted(basis & {'DB', 'ENV_ASSERTION'})}"
            )
        db_match = task.env_criteria_absent or facts.predicted_hashes == facts.gold_hashes
        met = [raw == a.assert_value for raw, a in zip(facts.assertions, task.env_assertions, strict=True)]
        detail["db_match"] = db_match
        detail["env_assertions"] = met
        if "DB" in basis:
            breakdown["DB"] = 1.0 if db_match else 0.0
            reward *= breakdown["DB"]
        if "ENV_ASSERTION" in basis:
            breakdown["ENV_ASSERTION"] = 1.0 if all(met) else 0.0
            reward *= breakdown["ENV_ASSERTION"]

    if "ACTION" in basis:
        calls = predicted_tool_calls(messages)
        checks = [any(action_matches(action, call) for call in calls) for action in task.actions]
        detail["action_checks"] = [
            {"action_id": a.action_id, "name": a.name, "matched": ok}
            for a, ok in zip(task.actions, checks, strict=True)
        ]
        breakdown["ACTION"] = 1.0 if all(checks) else 0.0
        reward *= breakdown["ACTION"]

    if "NL_ASSERTION" in basis:
        if nl is None:
            return verdict(
                0.0,
                error="NL assertions are part of this task's reward but no judge endpoint is configured",
                **detail,
            )
        detail["nl_assertions"] = list(nl.met)
        detail["nl_judge"] = nl.judge
        breakdown["NL_ASSERTION"] = 1.0 if all(nl.met) else 0.0
        reward *= breakdown["NL_ASSERTION"]

    if "COMMUNICATE" in basis:
        checks = [communicated(info, messages) for info in task.communicate_info]
        detail["communicate_checks"] = [
            {"info": i, "met": ok} for i, ok in zip(task.communicate_info, checks, strict=True)
        ]
        breakdown["COMMUNICATE"] = 1.0 if all(checks) else 0.0
        reward *= breakdown["COMMUNICATE"]

    detail["reward_breakdown"] = breakdown
    return verdict(reward, **detail)
