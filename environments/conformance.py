"""Conformance with BFCL's own multi-turn checker: ground-truth replay and perturbed trajectories.

A trajectory here is, per user turn, a list of tool steps, each a list of calls. envtune plays it
through an ``Episode`` (each step as a ``<tool_call>`` reply, then an ``<answer>``) and BFCL's
checker judges the same calls in its pythonic form. BFCL's verdict is its ``multi_turn_checker``
together with its ``multi_turn_irrelevance_checker`` (a turn with empty ground truth must not
call: the package's runner has that line commented out, envtune applies it: docs/method.md §3.3).

Perturbations only use functions visible at that turn: envtune makes hidden functions uncallable
on purpose, while BFCL's executor would run any method of its instances.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from envtune.environments.episode import BfclEnvironment, EpisodeConfig
from envtune.environments.ground_truth import ground_truth_calls
from envtune.environments.instances import public_methods
from envtune.environments.tasks import Task, load_function_docs, thaw
from envtune.environments.tool_calls import (
    ANSWER_REPLY,
    format_pythonic_call,
    format_reply,
)
from envtune.environments.types import FeedbackMode, ToolCall

Steps = list[list[ToolCall]]
"""One turn: a list of tool steps, each a list of calls."""


@dataclass(frozen=True, slots=True)
class ScriptedRun:
    """A scripted model run of one task."""

    task_id: str
    kind: str
    """``ground_truth`` or the perturbation applied."""
    turns: tuple[tuple[tuple[ToolCall, ...], ...], ...]
    """Per turn, per step, the calls."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """Both judges' verdicts on one trajectory."""

    trajectory: ScriptedRun
    envtune_pass: bool
    bfcl_pass: bool
    envtune_turns: tuple[bool, ...]
    bfcl_detail: str

    @property
    def agree(self) -> bool:
        return self.envtune_pass == self.bfcl_pass


def ground_truth_run(task: Task) -> ScriptedRun:
    """One step per turn with all of its ground-truth calls (no step for an empty turn)."""
    turns = tuple((tuple(calls),) if calls else () for calls in ground_truth_calls(task))
    return ScriptedRun(task_id=task.id, kind="ground_truth", turns=turns)


def play_envtune(env: BfclEnvironment, trajectory: ScriptedRun, feedback: FeedbackMode) -> tuple[bool, ...]:
    """Play a trajectory through an envtune episode; per-turn verdicts."""
    task = env.tasks[trajectory.task_id]
    config = EpisodeConfig(feedback=feedback, max_steps_per_turn=max(20, 1 + max(map(len, trajectory.turns))))
    episode = env.make_episode(task.id, config)
    episode.start()
    for turn_steps in trajectory.turns:
        if episode.done:
            break
        turn_closed = False
        for calls in turn_steps:
            result = episode.step(format_reply(calls, think="replaying"))
            if result.turn_ended:
                turn_closed = True
                break
        if not turn_closed and not episode.done:
            episode.step(ANSWER_REPLY)
    return episode.score().turn_passed


def judge_bfcl(task: Task, trajectory: ScriptedRun, model_name: str) -> tuple[bool, str]:
    """BFCL's own checker on the same calls (its pythonic form), state kept in its module globals."""
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_checker as checker
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils

    decoded = [
        [[format_pythonic_call(c) for c in step] for step in turn if step] for turn in trajectory.turns
    ]
    entry = {
        "id": task.id,
        "initial_config": thaw(task.initial_config),
        "involved_classes": list(task.involved_classes),
    }
    ground_truth = [list(turn) for turn in task.ground_truth]
    try:
        accuracy = checker.multi_turn_checker(
            decoded, ground_truth, entry, f"multi_turn_{task.category}", model_name
        )
        irrelevance = checker.multi_turn_irrelevance_checker(decoded, ground_truth)
    finally:
        # BFCL keeps instances in module globals keyed by model name and task id: drop ours.
        for key in [k for k in vars(multi_turn_utils) if k.startswith(model_name)]:
            delattr(multi_turn_utils, key)
    if not accuracy["valid"]:
        return False, str(accuracy.get("error_type", "invalid"))
    if not irrelevance["valid"]:
        return False, str(irrelevance.get("error_type", "irrelevance"))
    return True, "valid"


# --- perturbations ---------------------------------------------------------------------------


def _visible_names(task: Task, turn: int) -> list[str]:
    hidden = task.hidden_functions(turn)
    return sorted(
        name
        for class_name in task.involved_classes
        for name in public_methods(class_name)
        if name not in hidden
    )


def _alter_value(value: Any, rng: random.Random) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + rng.choice([-1, 1, 7])
    if isinstance(value, float):
        return value + rng.choice([0.5, -1.0, 10.0])
    if isinstance(value, str):
        return rng.choice([value + "_x", value.upper() if value != value.upper() else value + "Z", ""])
    if isinstance(value, list):
        return value[:-1] if value else ["x"]
    if isinstance(value, dict):
        return {**value, "extra": 1} if value else {"k": "v"}
    return "x"


def _turn_with_calls(turns: list[list[ToolCall]], rng: random.Random) -> int | None:
    candidates = [i for i, calls in enumerate(turns) if calls]
    return rng.choice(candidates) if candidates else None


def perturb(task: Task, kind: str, rng: random.Random) -> ScriptedRun | None:
    """One perturbed trajectory of a kind, or None when the kind does not apply to the task."""
    turns = [list(calls) for calls in ground_truth_calls(task)]
    docs = load_function_docs()
    t = _turn_with_calls(turns, rng)
    if kind == "drop_call":
        if t is None:
            return None
        del turns[t][rng.randrange(len(turns[t]))]
    elif kind == "alter_argument":
        if t is None:
            return None
        i = rng.randrange(len(turns[t]))
        call = turns[t][i]
        if not call.arguments:
            return None
        key = rng.choice(sorted(call.arguments))
        turns[t][i] = ToolCall(call.name, {**call.arguments, key: _alter_value(call.arguments[key], rng)})
    elif kind == "reorder_calls":
        if t is None or len(turns[t]) < 2:
            return None
        i, j = rng.sample(range(len(turns[t])), 2)
        turns[t][i], turns[t][j] = turns[t][j], turns[t][i]
    elif kind == "extra_call":
        if t is None:
            return None
        visible = set(_visible_names(task, t))
        source = [c for calls in turns for c in calls if c.name in visible]
        turns[t].insert(rng.randrange(len(turns[t]) + 1), rng.choice(source))
    elif kind == "wrong_function":
        if t is None:
            return None
        i = rng.randrange(len(turns[t]))
        call = turns[t][i]
        same_class = [
            n
            for n in _visible_names(task, t)
            if n != call.name and docs[n].class_name == docs[call.name].class_name
        ]
        if not same_class:
            return None
        turns[t][i] = ToolCall(rng.choice(same_class), dict(call.arguments))
    elif kind == "skip_turn":
        if t is None:
            return None
        turns[t] = []
    elif kind == "call_on_empty_turn":
        empty = [i for i, calls in enumerate(turns) if not calls]
        if not empty:
            return None
        target = rng.choice(empty)
        visible = set(_visible_names(task, target))
        source = [c for calls in turns for c in calls if c.name in visible]
        if not source:
            return None
        turns[target] = [rng.choice(source)]
    elif kind == "split_steps":
        if t is None or len(turns[t]) < 2:
            return None
        cut = rng.randrange(1, len(turns[t]))
        steps = [turns[t][:cut], turns[t][cut:]]
        as_steps: list[tuple[tuple[ToolCall, ...], ...]] = [((tuple(c),) if c else ()) for c in turns]
        as_steps[t] = tuple(tuple(s) for s in steps)
        return ScriptedRun(task_id=task.id, kind=kind, turns=tuple(as_steps))
    else:
        raise ValueError(f"unknown perturbation {kind!r}")
    return ScriptedRun(task_id=task.id, kind=kind, turns=tuple(((tuple(c),) if c else ()) for c in turns))


PERTURBATIONS: tuple[str, ...] = (
    "drop_call",
    "alter_argument",
    "reorder_calls",
    "extra_call",
    "wrong_function",
    "skip_turn",
    "call_on_empty_turn",
    "split_steps",
)


def perturbed_runs(tasks: Sequence[Task], per_task: int, seed: int) -> Iterator[ScriptedRun]:
    """``per_task`` perturbed trajectories of each task, kinds cycling, deterministic for a seed."""
    rng = random.Random(seed)
    for index, task in enumerate(tasks):
        made = 0
        attempts = 0
        while made < per_task and attempts < 4 * per_task:
            kind = PERTURBATIONS[(index + attempts) % len(PERTURBATIONS)]
            attempts += 1
            trajectory = perturb(task, kind, rng)
            if trajectory is not None:
                made += 1
                yield trajectory


def judge(env: BfclEnvironment, trajectory: ScriptedRun, serial: int, feedback: FeedbackMode) -> Verdict:
    """Both verdicts on one trajectory."""
    task = env.tasks[trajectory.task_id]
    turns = play_envtune(env, trajectory, feedback)
    bfcl_pass, detail = judge_bfcl(task, trajectory, model_name=f"envtune_conformance_{serial}")
    return Verdict(
        trajectory=trajectory,
        envtune_pass=all(turns),
        bfcl_pass=bfcl_pass,
        envtune_turns=turns,
        bfcl_detail=detail,
    )
