"""Conformance of envtune's τ² verdicts with tau2's own evaluator.

A ``Plan`` scripts both sides of a conversation: the agent's tool steps and messages, and the replies
of a ``ScriptedUser`` (which acts on its phone in telecom). envtune plays it through a ``Tau2Episode``
and judges it (``judge.py``); the exported trajectory and its termination reason then go to tau2's
``evaluate_simulation`` in the worker (``EvaluationType.ALL``), the reference.

Plans: the ground truth (every gold action in order, by the agent or — for the user's actions — by the
user when the agent asks, then the information to communicate, then the user's stop) and
perturbations: an action dropped, two actions swapped, an argument changed, an extra read call, the
information withheld, the agent ending the call itself, errors until the error limit, and the step
limit reached.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from envtune.environments.tau2.data import Action, Tau2Task, thaw
from envtune.environments.tau2.environment import Tau2Environment
from envtune.environments.tau2.user import ScriptedUser, UserReply
from envtune.environments.tau2.worker import Tau2Worker
from envtune.environments.types import ToolCall

OPENING = "Hi, I need some help with my account."
ASK_USER = "Please do the following on your phone, then tell me when it is done."
CLOSING = "Thank you, everything is taken care of."
READ_PREFIXES = ("get_", "search_", "list_", "find_", "calculate", "think", "check_")
"""Tool names that only read (a naming convention of tau2's domains; used to aim perturbations)."""


@dataclass(frozen=True, slots=True)
class Segment:
    """The agent's tool steps, then its message, then the user's replies to that message."""

    agent_steps: tuple[tuple[ToolCall, ...], ...]
    agent_text: str
    user_replies: tuple[UserReply, ...] = ()


@dataclass(frozen=True, slots=True)
class Plan:
    task_id: str
    kind: str
    segments: tuple[Segment, ...]
    max_steps: int | None = None
    """A tighter step limit for the ``max_steps`` perturbation."""
    user_opening: UserReply = field(default_factory=lambda: UserReply(text=OPENING))

    def user_script(self) -> list[UserReply]:
        return [self.user_opening, *(reply for segment in self.segments for reply in segment.user_replies)]


@dataclass(frozen=True, slots=True)
class Agreement:
    plan: Plan
    envtune_reward: float
    reference_reward: float
    termination: str
    detail: dict[str, Any]

    @property
    def agree(self) -> bool:
        return abs(self.envtune_reward - self.reference_reward) <= 1e-9


def _call(action: Action) -> ToolCall:
    return ToolCall(action.name, thaw(action.arguments))


def plan_from_actions(
    task: Tau2Task, actions: Sequence[Action], kind: str, *, say_info: bool = True, agent_stops: bool = False
) -> Plan:
    """Agent actions as one call per step; each run of user actions is requested by the agent."""
    segments: list[Segment] = []
    pending: list[tuple[ToolCall, ...]] = []
    index = 0
    while index < len(actions):
        action = actions[index]
        if action.requestor != "user":
            pending.append((_call(action),))
            index += 1
            continue
        user_calls = []
        while index < len(actions) and actions[index].requestor == "user":
            user_calls.append(_call(actions[index]))
            index += 1
        segments.append(
            Segment(
                tuple(pending), ASK_USER, (UserReply(tool_calls=tuple(user_calls)), UserReply(text="Done."))
            )
        )
        pending = []
    info = " ".join(task.communicate_info) if say_info else ""
    final_text = f"{CLOSING} {info}".strip()
    if agent_stops:
        segments.append(Segment(tuple(pending), f"{final_text} ###STOP###"))
    else:
        segments.append(Segment(tuple(pending), final_text, (UserReply(text="Great, thanks! ###STOP###"),)))
    return Plan(task.id, kind, tuple(segments))


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "_x"
    if isinstance(value, list):
        return value[:-1] if value else ["x"]
    if isinstance(value, dict):
        return {**value, "extra": "x"}
    return "x"


def plans_for(task: Tau2Task, rng: random.Random, read_tool: str | None) -> list[Plan]:
    """The ground truth and every applicable perturbation of a task."""
    actions = list(task.actions)
    plans = [plan_from_actions(task, actions, "ground_truth")]
    if actions:
        # Target the actions that change state when there are any (a dropped lookup changes nothing).
        writes = [i for i, a in enumerate(actions) if not a.name.startswith(READ_PREFIXES)] or list(
            range(len(actions))
        )
        dropped = list(actions)
        del dropped[rng.choice(writes)]
        plans.append(plan_from_actions(task, dropped, "drop_action"))
        with_args = [i for i in writes if actions[i].arguments] or [
            i for i, a in enumerate(actions) if a.arguments
        ]
        if with_args:
            i = rng.choice(with_args)
            key = rng.choice(sorted(actions[i].arguments))
            changed = list(actions)
            changed[i] = replace(
                actions[i],
                arguments={**thaw(actions[i].arguments), key: _changed(thaw(actions[i].arguments[key]))},
            )
            plans.append(plan_from_actions(task, changed, "wrong_argument"))
    if len(actions) >= 2:
        i = rng.randrange(len(actions) - 1)
        swapped = list(actions)
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        plans.append(plan_from_actions(task, swapped, "reorder_actions"))
    if read_tool is not None and actions:
        first = next((a for a in actions if a.requestor == "assistant"), None)
        if first is not None:
            extra = Action("extra", "assistant", first.name, first.arguments, first.compare_args)
            plans.append(plan_from_actions(task, [extra, *actions], "extra_call"))
    if task.communicate_info:
        plans.append(plan_from_actions(task, actions, "withhold_info", say_info=False))
    plans.append(plan_from_actions(task, actions, "agent_stop", agent_stops=True))
    errors = Segment(tuple((ToolCall("no_such_tool", {}),) for _ in range(12)), "Sorry.")
    plans.append(Plan(task.id, "too_many_errors", (errors, *plan_from_actions(task, actions, "x").segments)))
    truth = plans[0]
    plans.append(replace(truth, kind="max_steps", max_steps=max(3, len(actions))))
    return plans


def play(env: Tau2Environment, plan: Plan) -> tuple[float, str, list[dict[str, Any]], dict[str, Any]]:
    """envtune's reward, termination reason, trajectory and verdict detail for a plan."""
    config = env.config if plan.max_steps is None else replace(env.config, max_steps=plan.max_steps)
    user = ScriptedUser(plan.user_script())
    episode = env.make_episode(plan.task_id, config, user=user)
    try:
        episode.start()
        for segment in plan.segments:
            for calls in segment.agent_steps:
                if episode.done:
                    break
                episode.step(tool_reply(calls))
            if episode.done:
                break
            episode.step(f"<think>telling the user</think><answer>{segment.agent_text}</answer>")
        if not episode.done:
            episode.close()
        verdict = episode.verdict()
        assert verdict is not None and episode.termination_reason is not None
        return verdict.reward, episode.termination_reason, episode.trajectory(), dict(verdict.detail)
    finally:
        episode.close()


def tool_reply(calls: Sequence[ToolCall]) -> str:
    import json

    body = json.dumps([{"name": c.name, "arguments": c.arguments} for c in calls])
    return f"<think>acting</think><tool_call>{body}</tool_call>"


def reference_reward(
    env: Tau2Environment,
    task_id: str,
    messages: list[dict[str, Any]],
    termination: str,
    worker: Tau2Worker | None = None,
) -> float:
    """tau2's ``evaluate_simulation`` on the same trajectory (in ``worker``, default the env's own)."""
    result = (worker or env.worker).request(
        "evaluate",
        domain=env.domain,
        task_id=task_id,
        messages=messages,
        termination_reason=termination,
        timeout_s=600,
    )
    return float(result["reward"])


def agreements(
    env: Tau2Environment,
    *,
    seed: int = 0,
    perturbed: bool = True,
    limit: int | None = None,
    kinds: Sequence[str] | None = None,
    task_ids: Sequence[str] | None = None,
    reference: Tau2Worker | None = None,
) -> Iterator[Agreement]:
    """Both verdicts on the plans of every task (or ``task_ids``, or the first ``limit``).

    With a second worker as ``reference``, tau2's evaluator judges one plan while envtune plays the
    next (two processes, two cores); otherwise both run on the environment's worker in turn.
    """
    rng = random.Random(seed)
    read_tool = next((doc.name for doc in env.info.tools if doc.name.startswith("get_")), None)
    tasks = [env.task_map[i] for i in task_ids] if task_ids is not None else list(env.task_map.values())
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: tuple[Plan, float, str, dict[str, Any], Future[float]] | None = None
        for task in tasks[:limit]:
            plans = plans_for(task, rng, read_tool)
            if not perturbed:
                plans = plans[:1]
            elif kinds is not None:
                plans = [p for p in plans if p.kind in kinds or p.kind == "ground_truth"]
            for plan in plans:
                reward, termination, messages, detail = play(env, plan)
                if reference is None:
                    yield Agreement(
                        plan,
                        reward,
                        reference_reward(env, plan.task_id, messages, termination),
                        termination,
                        detail,
                    )
                    continue
                future = pool.submit(reference_reward, env, plan.task_id, messages, termination, reference)
                if pending is not None:
                    yield Agreement(*pending[:2], pending[4].result(), *pending[2:4])
                pending = (plan, reward, termination, detail, future)
        if pending is not None:
            yield Agreement(*pending[:2], pending[4].result(), *pending[2:4])


def summary(items: Sequence[Agreement]) -> dict[str, Any]:
    by_kind: dict[str, list[bool]] = {}
    for item in items:
        by_kind.setdefault(item.plan.kind, []).append(item.agree)
    truth = [a for a in items if a.plan.kind == "ground_truth"]
    return {
        "tasks": len(truth),
        "ground_truth_reward1_envtune": sum(a.envtune_reward == 1.0 for a in truth),
        "ground_truth_reward1_tau2": sum(a.reference_reward == 1.0 for a in truth),
        "runs": len(items),
        "agreement": sum(a.agree for a in items) / len(items) if items else 0.0,
        "by_kind": {kind: sum(v) / len(v) for kind, v in sorted(by_kind.items())},
    }


__all__ = ["Agreement", "Plan", "Segment", "agreements", "plans_for", "summary"]


def replay_into_session(
    env: Tau2Environment, task_id: str, messages: Sequence[dict[str, Any]], session: str
) -> None:
    """Open ``session`` and replay a finished trajectory's tool calls into it (as tau2's ``set_state``)."""
    env.worker.open_session(session, env.domain, task_id)
    for message in messages:
        for call in message.get("tool_calls") or ():
            env.worker.call(
                session, call["name"], call["arguments"], requestor=call["requestor"], call_id=call["id"]
            )
