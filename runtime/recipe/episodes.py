"""The glue between the curriculum and the rollout: where tasks come from and how one is played.

* ``CurriculumTaskSource``: the rollout's ``TaskSource`` over a ``CurriculumScheduler``.
* ``GroupAdapters``: the rollout's ``GroupPins``: the adapter current at a group's dispatch is held
  for the group, so all its members sample under one policy version.
* ``CurriculumEpisodes``: the rollout's episode runner: one BFCL episode under the conditions its
  ``CurriculumTask`` carries (so an episode in flight at a promotion finishes under the stage it
  started in), sampled with its group's pinned adapter.
* ``make_validator``: greedy episodes on the held-out validation ids with the current adapter.

Left out: the episode loop itself (``agents``), the learner (``learner_actor``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Protocol

from envtune.agents.chat_tokens import ChatTokenizer
from envtune.agents.config import AgentConfig, SamplingConfig
from envtune.agents.engine import Engine
from envtune.agents.episode_loop import run_episode
from envtune.agents.grammar import ConstraintCache
from envtune.agents.trajectory import Trajectory
from envtune.environments.episode import BfclEnvironment, EpisodeConfig
from envtune.runtime.recipe.config import EvalConditions
from envtune.runtime.recipe.curriculum import CurriculumScheduler, CurriculumTask
from envtune.runtime.recipe.evaluation import evaluate_tasks, summarize
from envtune.runtime.weight_sync import AdapterPublisher, PublishedAdapter


class EpisodeSource(Protocol):
    """Makes the episode of a task under a stage's conditions (``BfclEnvironment``; a toy one in
    tests): ``start``, ``step``, ``visible_tools``, ``score`` and ``close`` of ``environments.Episode``."""

    def make_episode(self, task_id: str, config: EpisodeConfig) -> Any: ...


class CurriculumTaskSource:
    """The rollout's task source: the scheduler's next task until the curriculum ends or is closed."""

    def __init__(self, scheduler: CurriculumScheduler) -> None:
        self._scheduler = scheduler
        self._closed = False

    def close(self) -> None:
        """Hand out nothing more (the run is ending)."""
        self._closed = True

    async def next_task(self) -> CurriculumTask | None:
        if self._closed or self._scheduler.finished:
            return None
        return self._scheduler.next_task()


class GroupAdapters:
    """Pins the publisher's current adapter to a group from dispatch to its end (``GroupPins``)."""

    def __init__(self, publisher: AdapterPublisher) -> None:
        self._publisher = publisher
        self._pinned: dict[str, PublishedAdapter | None] = {}

    def pin(self, group_id: str) -> int | None:
        if group_id in self._pinned:
            raise ValueError(f"group {group_id} is already pinned")
        adapter = self._publisher.acquire()
        self._pinned[group_id] = adapter
        return adapter.version if adapter is not None else None

    async def unpin(self, group_id: str) -> None:
        await self._publisher.release(self._pinned.pop(group_id))

    def adapter(self, group_id: str) -> PublishedAdapter | None:
        """The group's adapter (None: the base model); KeyError for a group that is not pinned."""
        return self._pinned[group_id]

    def __contains__(self, group_id: object) -> bool:
        return group_id in self._pinned


class CurriculumEpisodes:
    """Plays one training episode of a ``CurriculumTask`` (the rollout's ``EpisodeRunner``)."""

    def __init__(
        self,
        engine: Engine,
        env: EpisodeSource,
        chat: ChatTokenizer,
        publisher: AdapterPublisher,
        sampling: SamplingConfig,
        constraints: ConstraintCache | None = None,
        pins: GroupAdapters | None = None,
    ) -> None:
        self._engine = engine
        self._env = env
        self._chat = chat
        self._publisher = publisher
        self._sampling = sampling
        self._constraints = constraints if constraints is not None else ConstraintCache()
        self.pins = pins
        """The rollout's group pins; a group not pinned there samples with the adapter current
        when its episode starts."""

    async def __call__(self, task: CurriculumTask, group_id: str, start_version: int) -> Trajectory:
        if not isinstance(task, CurriculumTask):
            raise TypeError(f"expected a CurriculumTask, got {type(task).__name__}")
        episode = self._env.make_episode(task.task_id, task.episode)
        try:
            if self.pins is not None and group_id in self.pins:
                return await self._play(task, group_id, start_version, episode, self.pins.adapter(group_id))
            async with self._publisher.use() as adapter:
                return await self._play(task, group_id, start_version, episode, adapter)
        finally:
            episode.close()

    async def _play(
        self,
        task: CurriculumTask,
        group_id: str,
        start_version: int,
        episode: Any,
        adapter: PublishedAdapter | None,
    ) -> Trajectory:
        sampling = self._sampling
        if task.max_replies:
            sampling = replace(sampling, max_replies=task.max_replies)
        agent = AgentConfig(
            sampling=sampling,
            constrained=task.constrained,
            reward=task.reward,
            adapter=adapter.name if adapter is not None else None,
        )
        return await run_episode(
            self._engine,
            episode,
            self._chat,
            agent,
            task_id=task.task_id,
            group_id=group_id,
            stage=task.stage,
            start_version=start_version,
            constraints=self._constraints,
        )


def make_validator(
    scheduler: CurriculumScheduler,
    engine: Engine,
    env: BfclEnvironment,
    chat: ChatTokenizer,
    publisher: AdapterPublisher,
    sampling: SamplingConfig,
    *,
    concurrency: int,
    constraints: ConstraintCache | None = None,
) -> Callable[[], Awaitable[dict[str, float]]]:
    """Validation on the held-out validation ids: greedy, with the current adapter, under the current
    stage's prompt and constraint and the curriculum's validation feedback and step limit."""
    greedy = replace(sampling, temperature=0.0)

    async def validate() -> dict[str, float]:
        specs = scheduler.validation_tasks()
        if not specs:
            return {}
        first = specs[0]
        conditions = EvalConditions(
            episode=first.episode, constrained=first.constrained, concurrency=concurrency
        )
        async with publisher.use() as adapter:
            results = await evaluate_tasks(
                engine,
                env,
                chat,
                [s.task_id for s in specs],
                sampling=greedy,
                conditions=conditions,
                adapter=adapter.name if adapter is not None else None,
                constraints=constraints,
            )
        summary = summarize(results)
        out = {
            "validation/accuracy": summary.overall_accuracy,
            "validation/progress": sum(r.progress for r in results) / len(results),
            "validation/format_reward": sum(r.format_reward for r in results) / len(results),
            "validation/errors": float(summary.errors),
        }
        out.update({f"validation/accuracy/{name}": s.accuracy for name, s in summary.categories.items()})
        return out

    return validate
