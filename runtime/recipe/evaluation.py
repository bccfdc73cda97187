"""BFCL V3 multi-turn accuracy of a model (optionally with a LoRA adapter): ``envtune-eval``'s core and
the training run's validation.

Evaluation conditions are BFCL's: standard tool feedback, at most 20 replies per user turn, greedy
decoding, one episode per task. A task passes when every one of its turns passes
(``EpisodeScore.all_passed``: the environment's state and execution-result checks, the same
verdicts as BFCL's multi-turn checker). Accuracy is reported per category and overall; overall is
the unweighted mean of the category accuracies, as BFCL's multi-turn summary is (with 100 test
tasks per category it equals the plain mean).

``evaluate_tasks`` runs the episodes; one task that cannot be run (an engine failure, an exception
anywhere in its episode) is one failed task with its error, never a lost evaluation; only an engine
that is gone altogether (``EngineUnavailable``) ends the evaluation, with that error. Left out: the
command line and the engines (``envtune.runtime.cli.evaluate``).
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog
from envtune.agents.chat_tokens import ChatTokenizer
from envtune.agents.config import AgentConfig, SamplingConfig
from envtune.agents.engine import Engine, EngineUnavailable
from envtune.agents.episode_loop import run_episode
from envtune.agents.grammar import ConstraintCache
from envtune.environments.episode import BfclEnvironment
from envtune.environments.tasks import CATEGORIES, load_split, load_tasks
from envtune.environments.types import RewardKind
from envtune.runtime.recipe.config import EvalConditions

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class TaskResult:
    """One evaluated task."""

    task_id: str
    """BFCL id."""
    category: str
    """Its category."""
    passed: bool
    """BFCL's verdict: every turn passed."""
    progress: float
    """Passed turns / all turns."""
    format_reward: float
    """R_format of the episode."""
    truncated: bool
    """The episode hit a length cap."""
    error: str | None = None
    """Why the episode could not be run (counted as failed)."""


@dataclass(frozen=True, slots=True)
class CategoryScore:
    """Accuracy of one category."""

    n: int
    """Tasks evaluated."""
    passed: int
    """Tasks passed."""
    accuracy: float
    """passed / n."""
    progress: float
    """Mean progress (partial credit, for reading; not a BFCL figure)."""


@dataclass(frozen=True, slots=True)
class EvalSummary:
    """Per-category and overall accuracy."""

    categories: Mapping[str, CategoryScore]
    """Category -> its score (only categories that were evaluated)."""
    overall_accuracy: float
    """Unweighted mean of the category accuracies (BFCL's overall)."""
    micro_accuracy: float
    """Passed / evaluated over all tasks."""
    n: int
    """Tasks evaluated."""
    errors: int
    """Episodes that failed to run (counted as not passed)."""
    results: tuple[TaskResult, ...] = field(default=(), repr=False)
    """Every task's result."""

    def to_json(self, *, include_results: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "overall_accuracy": self.overall_accuracy,
            "micro_accuracy": self.micro_accuracy,
            "n": self.n,
            "errors": self.errors,
            "categories": {name: asdict(score) for name, score in self.categories.items()},
        }
        if include_results:
            out["results"] = [asdict(r) for r in self.results]
        return out


def summarize(results: Sequence[TaskResult]) -> EvalSummary:
    """Aggregate task results, categories in BFCL's order."""
    categories: dict[str, CategoryScore] = {}
    for name in CATEGORIES:
        rows = [r for r in results if r.category == name]
        if rows:
            passed = sum(r.passed for r in rows)
            categories[name] = CategoryScore(
                n=len(rows),
                passed=passed,
                accuracy=passed / len(rows),
                progress=statistics.fmean(r.progress for r in rows),
            )
    return EvalSummary(
        categories=categories,
        overall_accuracy=statistics.fmean(s.accuracy for s in categories.values()) if categories else 0.0,
        micro_accuracy=sum(r.passed for r in results) / len(results) if results else 0.0,
        n=len(results),
        errors=sum(r.error is not None for r in results),
        results=tuple(results),
    )


async def evaluate_tasks(
    engine: Engine,
    env: BfclEnvironment,
    chat: ChatTokenizer,
    task_ids: Sequence[str],
    *,
    sampling: SamplingConfig,
    conditions: EvalConditions,
    adapter: str | None = None,
    constraints: ConstraintCache | None = None,
) -> list[TaskResult]:
    """Run one episode per task; results in the order of ``task_ids``.

    ``adapter`` names a loaded LoRA adapter (None: the engine's base weights).
    """
    agent = AgentConfig(
        sampling=sampling, constrained=conditions.constrained, reward=RewardKind.PROGRESS, adapter=adapter
    )
    cache = constraints if constraints is not None else ConstraintCache()
    slots = asyncio.Semaphore(conditions.concurrency)

    async def one(index: int, task_id: str) -> TaskResult:
        category = env.tasks[task_id].category
        async with slots:
            try:
                episode = env.make_episode(task_id, conditions.episode)
                try:
                    trajectory = await run_episode(
                        engine,
                        episode,
                        chat,
                        agent,
                        task_id=task_id,
                        group_id=f"eval-{index}",
                        constraints=cache,
                    )
                finally:
                    episode.close()
            except EngineUnavailable:
                raise  # the engine is gone: no further task could run either
            except Exception as exc:
                # A task that cannot be run is a failed task, as in BFCL; the evaluation goes on.
                log.warning("eval_episode_failed", task_id=task_id, error=repr(exc))
                return TaskResult(task_id, category, False, 0.0, 0.0, False, error=repr(exc))
        return TaskResult(
            task_id=task_id,
            category=category,
            passed=all(trajectory.turn_passed),
            progress=trajectory.progress,
            format_reward=trajectory.format_reward,
            truncated=trajectory.truncated,
        )

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(i, task_id)) for i, task_id in enumerate(task_ids)]
    except* EngineUnavailable as lost:
        raise lost.exceptions[0] from None
    return [t.result() for t in tasks]


def select_tasks(split_part: str, categories: Sequence[str], limit: int) -> list[str]:
    """Ids of a split part, restricted to ``categories``, at most ``limit`` per category (0 = all)."""
    tasks = load_tasks()
    ids = load_split().ids(split_part)
    out: list[str] = []
    for category in categories:
        chosen = [i for i in ids if tasks[i].category == category]
        out.extend(chosen[:limit] if limit else chosen)
    return out
