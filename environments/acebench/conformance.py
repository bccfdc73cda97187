"""Conformance of envtune's ACEBench end-state verdicts with the checkout's own ``agent_checker``.

Plans replay a task's milestone calls (the first milestone list; a task whose milestones do not parse
as calls — ACEBench writes a few with unescaped quotes — is reported, not replayed), then answer; a
multi-turn plan's scripted user opens with the task's instruction and finishes after the answer.
Perturbations drop a milestone step, change an argument, or stop halfway. The reference runs the
checkout's ``model_eval.checker.agent_checker`` (in the scenario worker) on each class of the same end
state, inside the per-task loop of ACEBench's ``agent_eval`` (same length, first entry of the same
class, a verdict carried over when none matches), which lives in its CLI module with its file output.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from envtune.environments.acebench.data import AceTask
from envtune.environments.acebench.environment import AceBenchEnvironment
from envtune.environments.tau2.user import ScriptedUser, UserReply
from envtune.environments.tool_calls import FormatError, parse_pythonic_calls
from envtune.environments.types import ToolCall


@dataclass(frozen=True, slots=True)
class Plan:
    task_id: str
    kind: str
    steps: tuple[tuple[ToolCall, ...], ...]


@dataclass(frozen=True, slots=True)
class Agreement:
    plan: Plan
    envtune_pass: bool
    reference_pass: bool
    process_accuracy: float

    @property
    def agree(self) -> bool:
        return self.envtune_pass == self.reference_pass


def milestone_steps(task: AceTask) -> tuple[tuple[ToolCall, ...], ...] | None:
    try:
        return tuple(parse_pythonic_calls(text) for text in task.milestones[0])
    except FormatError:
        return None


def plans_for(task: AceTask, rng: random.Random) -> list[Plan]:
    steps = milestone_steps(task)
    if steps is None:
        return []
    plans = [Plan(task.id, "ground_truth", steps)]
    if steps:
        index = rng.randrange(len(steps))
        plans.append(Plan(task.id, "drop_step", steps[:index] + steps[index + 1 :]))
        plans.append(Plan(task.id, "stop_halfway", steps[: len(steps) // 2]))
        with_args = [(i, j) for i, step in enumerate(steps) for j, call in enumerate(step) if call.arguments]
        if with_args:
            i, j = rng.choice(with_args)
            call = steps[i][j]
            key = rng.choice(sorted(call.arguments))
            value = call.arguments[key]
            changed = value + 1 if isinstance(value, int) and not isinstance(value, bool) else f"{value}x"
            step = list(steps[i])
            step[j] = replace(call, arguments={**call.arguments, key: changed})
            plans.append(Plan(task.id, "wrong_argument", (*steps[:i], tuple(step), *steps[i + 1 :])))
    return plans


def play(env: AceBenchEnvironment, plan: Plan) -> tuple[bool, list[dict[str, Any]], float]:
    import json

    task = env.task_map[plan.task_id]
    user = None
    if task.category == "agent_multi_turn":
        user = ScriptedUser([UserReply(text=task.question), UserReply(text="Thanks. finish conversation")])
    episode = env.make_episode(plan.task_id, user=user)
    episode.start()
    for calls in plan.steps:
        if episode.done:
            break
        body = json.dumps([{"name": c.name, "arguments": c.arguments} for c in calls])
        episode.step(f"<think>acting</think><tool_call>{body}</tool_call>")
    if not episode.done:
        episode.step("<think>done</think><answer>All done.</answer>")
    episode.close()
    verdict = episode.verdict()
    assert verdict is not None
    return (
        verdict.passed,
        list(verdict.detail.get("end_state", [])),
        float(verdict.detail.get("process_accuracy", 0.0)),
    )


def reference_pass(env: AceBenchEnvironment, task: AceTask, result: Sequence[dict[str, Any]]) -> bool:
    truth = task.ground_truth_json()
    if len(truth) != len(result):
        return False
    valid = True
    checked: dict[str, Any] = {"valid": True}
    for expected in truth:
        match = next((item for item in result if set(item) == set(expected)), None)
        if match is not None:
            checked = env.worker.request("reference_check", model_output=match, possible_answer=expected)
        if not checked["valid"]:
            valid = False
    return valid


def agreements(env: AceBenchEnvironment, *, seed: int = 0) -> Iterator[Agreement | str]:
    """Both verdicts per plan; a task whose milestones cannot be replayed yields its id."""
    rng = random.Random(seed)
    for task in env.task_map.values():
        plans = plans_for(task, rng)
        if not plans:
            yield task.id
            continue
        for plan in plans:
            passed, state, process = play(env, plan)
            yield Agreement(plan, passed, reference_pass(env, task, state), process)
