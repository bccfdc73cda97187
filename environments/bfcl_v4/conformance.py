"""Conformance of envtune's BFCL V4 verdicts with BFCL's own checker (``bfcl-eval==2026.3.23``).

A ``Plan`` is a scripted run of one question: tool steps and a final answer. envtune plays it through
an episode (``<tool_call>`` replies, then ``<answer>``); the reference judges the same run as BFCL's
runner does: the last step that does not decode as function calls is the response, and BFCL's
``agentic_checker`` (loaded from the pinned wheel, see ``reference_modules.py``) looks for a possible
answer in it; a run whose steps are all function calls fails with ``agentic:no_last_message``.

Plans: the ground truth (look something up, answer with a possible answer) and perturbations of the
answer (wrong, cut, glued into a word, re-cased and re-punctuated, quoted, empty, refused, missing) and
of the calls (dropped, reordered, wrong argument), which must not change the verdict. Memory
questions run after their scenario's prerequisite conversations, played by a scripted writer that
stores every user message.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from envtune.environments.assets import BFCL_V4
from envtune.environments.bfcl_v4.data import AgenticTask
from envtune.environments.bfcl_v4.episode import AgenticEpisode
from envtune.environments.bfcl_v4.memory_env import MemoryEnvironment
from envtune.environments.bfcl_v4.web_search_env import WebSearchEnvironment
from envtune.environments.episode import EVAL_MAX_STEPS_PER_TURN
from envtune.environments.reference_modules import load_reference_module
from envtune.environments.tool_calls import format_pythonic_call
from envtune.environments.types import ToolCall

CHECKER_MEMBER = "bfcl_eval/eval_checker/agentic_eval/agentic_checker.py"
Step = tuple[ToolCall, ...] | str
"""A tool step (its calls) or the final answer text."""


def reference_checker() -> ModuleType:
    """BFCL's ``agentic_checker`` module from the pinned wheel, under a private name."""
    return load_reference_module(BFCL_V4, CHECKER_MEMBER, "envtune_reference_bfcl_v4_agentic_checker")


@dataclass(frozen=True, slots=True)
class Plan:
    """A scripted run of one question."""

    task_id: str
    kind: str
    """``ground_truth`` or the perturbation's name."""
    steps: tuple[Step, ...]


@dataclass(frozen=True, slots=True)
class Agreement:
    """Both verdicts on one plan."""

    plan: Plan
    envtune_pass: bool
    envtune_reason: str
    bfcl_pass: bool
    bfcl_reason: str

    @property
    def agree(self) -> bool:
        return self.envtune_pass == self.bfcl_pass


def call_reply(calls: Sequence[ToolCall]) -> str:
    body = json.dumps([{"name": c.name, "arguments": c.arguments} for c in calls])
    return f"<think>looking it up</think><tool_call>{body}</tool_call>"


def answer_reply(text: str) -> str:
    return f"<think>answering</think><answer>{text}</answer>"


def formatted_answer(answer: str) -> str:
    """An answer in the shape BFCL asks for."""
    return "{'answer': '" + answer + "', 'context': 'found with the tools'}"


# --- the two judges -------------------------------------------------------------------------------


def judge_envtune(episode: AgenticEpisode, plan: Plan) -> tuple[bool, str]:
    """Play the plan through a started episode; its verdict."""
    for step in plan.steps:
        if episode.done:
            break
        episode.step(answer_reply(step) if isinstance(step, str) else call_reply(step))
    if not episode.done:  # the plan ended without an answer: the runner's step budget ends it
        while not episode.done:
            episode.step(call_reply((ToolCall("no_such_tool", {}),)))
    verdict = episode.verdict()
    assert verdict is not None
    return verdict.passed, str(verdict.detail["reason"])


def judge_bfcl(task: AgenticTask, plan: Plan, max_steps: int = EVAL_MAX_STEPS_PER_TURN) -> tuple[bool, str]:
    """BFCL's runner and checker on the same run (steps as its prompting handler records them)."""
    checker = reference_checker()
    recorded: list[tuple[str, bool]] = []  # (text, decodes as function calls)
    for step in plan.steps:
        if isinstance(step, str):
            recorded.append((step, False))
            break  # a non-call message ends BFCL's turn
        recorded.append(("[" + ", ".join(format_pythonic_call(c) for c in step) + "]", True))
        if len(recorded) >= max_steps:
            break  # envtune's step budget; BFCL force-quits and keeps no final message
    last_message = None
    for text, decodes in recorded:
        if not decodes:
            last_message = text
    if not last_message:
        return False, "agentic:no_last_message"
    result = checker.agentic_checker(last_message, list(task.answers))
    return bool(result["valid"]), "valid" if result["valid"] else str(result.get("error_type"))


# --- plans -----------------------------------------------------------------------------------------


def lookup_calls(task: AgenticTask, backend: str | None) -> tuple[tuple[ToolCall, ...], ...]:
    """Tool steps a careful agent makes before answering (memory retrieval, or search and read)."""
    question = task.turns[0][0]
    if backend == "kv":
        return ((ToolCall("archival_memory_key_search", {"query": question, "k": 3}),),)
    if backend == "vector":
        return ((ToolCall("archival_memory_retrieve", {"query": question, "top_k": 3}),),)
    if backend == "rec_sum":
        return ((ToolCall("memory_retrieve", {}),),)
    steps = []
    for hop in task.sources:
        steps.append(
            (ToolCall("search_engine_query", {"keywords": str(hop["subquestion"]), "max_results": 5}),)
        )
        steps.append((ToolCall("fetch_url_content", {"url": str(hop["source"]), "mode": "truncate"}),))
    return tuple(steps)


def _recased(text: str) -> str:
    return "-".join(text.upper().split(" ")) + "."


def answer_perturbations(task: AgenticTask, other_answer: str) -> dict[str, str]:
    """Final answers that test the checker's rule (each plan keeps the ground-truth lookups)."""
    answer = task.answers[0]
    words = answer.split()
    return {
        "wrong_answer": formatted_answer(other_answer),
        "cut_answer": formatted_answer(
            " ".join(words[:-1]) if len(words) > 1 else answer[: max(1, len(answer) // 2)]
        ),
        "glued_answer": formatted_answer(f"x{answer}x"),
        "recased_answer": formatted_answer(_recased(answer)),
        "sentence_answer": f'The answer is "{answer}" according to what I found.',
        "refusal": formatted_answer("I do not know"),
        "empty_answer": "",
    }


def plans_for(
    task: AgenticTask, backend: str | None, rng: random.Random, others: Sequence[str]
) -> list[Plan]:
    """The ground truth and every perturbation of one question."""
    lookups = lookup_calls(task, backend)
    truth = formatted_answer(task.answers[0])
    plans = [Plan(task.id, "ground_truth", (*lookups, truth))]
    candidates = [a for a in others if a not in task.answers] or ["zzz"]
    for kind, text in answer_perturbations(task, rng.choice(candidates)).items():
        plans.append(Plan(task.id, kind, (*lookups, text)))
    plans.append(Plan(task.id, "no_answer", lookups * EVAL_MAX_STEPS_PER_TURN))
    if lookups:
        plans.append(Plan(task.id, "drop_calls", (truth,)))
        plans.append(Plan(task.id, "reorder_calls", (*reversed(lookups), truth)))
        first = lookups[0][0]
        if first.arguments:
            key = sorted(first.arguments)[0]
            wrong = ToolCall(first.name, {**first.arguments, key: f"{first.arguments[key]}_wrong"})
            plans.append(Plan(task.id, "wrong_argument", ((wrong,), *lookups[1:], truth)))
    return plans


# --- prerequisite conversations ----------------------------------------------------------------------


def writer_calls(backend: str, message: str, turn: int, conversation: str) -> tuple[ToolCall, ...]:
    """The scripted writer's step for one user message (store it, as a diligent agent would)."""
    if backend == "kv":
        key = re.sub(r"[^a-z0-9]+", "_", f"{conversation} turn {turn}".lower()).strip("_")
        return (ToolCall("archival_memory_add", {"key": key, "value": message[:2000]}),)
    if backend == "vector":
        return (ToolCall("archival_memory_add", {"text": message[:2000]}),)
    return (ToolCall("memory_append", {"text": message[:300] + "\n"}),)


def run_prerequisites(env: MemoryEnvironment, scenario: str | None = None) -> int:
    """Play every prerequisite conversation (of one scenario, or all) in chain order; turns played."""
    turns = 0
    for task in env.task_map.values():
        if task.scored or (scenario is not None and task.scenario != scenario):
            continue
        episode = env.make_episode(task.id)
        episode.start()
        conversation = f"{task.scenario} conversation {task.chain_index}"
        for index, messages in enumerate(task.turns):
            if episode.done:
                break
            episode.step(call_reply(writer_calls(env.backend, " ".join(messages), index, conversation)))
            episode.step(answer_reply("Noted, I have saved that."))
            turns += 1
        episode.close()
    return turns


# --- the whole check ---------------------------------------------------------------------------------


def judge_plan(make_episode: Callable[[str], AgenticEpisode], task: AgenticTask, plan: Plan) -> Agreement:
    episode = make_episode(task.id)
    episode.start()
    try:
        envtune_pass, envtune_reason = judge_envtune(episode, plan)
    finally:
        episode.close()
    bfcl_pass, bfcl_reason = judge_bfcl(task, plan)
    return Agreement(plan, envtune_pass, envtune_reason, bfcl_pass, bfcl_reason)


def environment_agreements(
    env: MemoryEnvironment | WebSearchEnvironment,
    *,
    seed: int = 0,
    perturbed: bool = True,
    limit: int | None = None,
) -> Iterator[Agreement]:
    """Ground truth (and perturbations) of every question of one suite, prerequisites played first."""
    backend = env.backend if isinstance(env, MemoryEnvironment) else None
    if isinstance(env, MemoryEnvironment):
        run_prerequisites(env)
    rng = random.Random(seed)
    questions = [t for t in env.task_map.values() if t.scored][:limit]
    others = [t.answers[0] for t in questions]
    for task in questions:
        plans = plans_for(task, backend, rng, others)
        for plan in plans if perturbed else plans[:1]:
            yield judge_plan(env.make_episode, task, plan)


def summary(agreements: Sequence[Agreement]) -> dict[str, Any]:
    by_kind: dict[str, list[bool]] = {}
    for item in agreements:
        by_kind.setdefault(item.plan.kind, []).append(item.agree)
    truth = [a for a in agreements if a.plan.kind == "ground_truth"]
    return {
        "tasks": len(truth),
        "ground_truth_pass_envtune": sum(a.envtune_pass for a in truth),
        "ground_truth_pass_bfcl": sum(a.bfcl_pass for a in truth),
        "runs": len(agreements),
        "agreement": sum(a.agree for a in agreements) / len(agreements) if agreements else 0.0,
        "by_kind": {kind: sum(v) / len(v) for kind, v in sorted(by_kind.items())},
    }
