"""The learner side of a training run, and the glue between the curriculum and the rollout.

* ``CurriculumTaskSource``: the rollout's ``TaskSource`` over a ``CurriculumScheduler``.
* ``EpisodeRunner``: the rollout's ``run_episode``: one BFCL episode under the conditions its
  ``CurriculumTask`` carries (so an episode in flight at a promotion finishes under the stage it
  started in), sampled with the adapter that is current when it starts.
* ``LearnerActor`` (named ``learner``; its mailbox is the trajectory queue): takes finished groups,
  lets the scheduler count them (zero-variance groups dropped or kept by config), drops groups too
  stale to train, and every ``groups_per_step`` kept groups runs one learner step (in a thread),
  publishes the adapter, tells the rollout the new policy version, validates when due, closes the
  curriculum step (maybe a promotion), writes the step's metrics and sample trajectories, and
  checkpoints. When the curriculum or the step budget ends it sets ``done``.

Left out: building engines and the process around the run (``cli.py``), the episode loop itself
(``agents``), the learning rule (``optim``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from envtune.agents.chat_tokens import ChatTokenizer
from envtune.agents.config import AgentConfig
from envtune.agents.episode_loop import run_episode
from envtune.agents.grammar import ConstraintCache
from envtune.agents.trajectory import Trajectory
from envtune.environments.episode import BfclEnvironment, EpisodeConfig
from envtune.optim.learner import Learner
from envtune.optim.weight_sync import AdapterPublisher
from envtune.runtime.actors import Actor, MailboxClosed
from envtune.runtime.config import SamplingConfig
from envtune.runtime.curriculum import CurriculumScheduler, CurriculumTask, GroupOutcome
from envtune.runtime.engines.base import Engine, SamplingParams
from envtune.runtime.evaluate import EvalSettings, evaluate_tasks, summarize
from envtune.runtime.rollout import GroupsDiscarded, PolicyUpdated, RolloutActor, TaskSpec, TrajectoryGroup
from envtune.runtime.run_folder import RunFolder

log = structlog.get_logger(__name__)

LEARNER_STATE_FILE = "learner.pt"
"""The learner's state (adapter, optimizer, counters, RNG) inside a checkpoint."""
ADAPTER_DIR = "adapter"
"""The adapter in peft layout inside a checkpoint (loadable by SGLang and ``envtune-eval``)."""


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


class EpisodeRunner:
    """Runs one training episode of a ``CurriculumTask`` (the rollout's ``EpisodeRunner``)."""

    def __init__(
        self,
        engine: Engine,
        env: BfclEnvironment,
        chat: ChatTokenizer,
        publisher: AdapterPublisher,
        sampling: SamplingConfig,
        constraints: ConstraintCache | None = None,
    ) -> None:
        self._engine = engine
        self._env = env
        self._chat = chat
        self._publisher = publisher
        self._sampling = SamplingParams(
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
        )
        self._max_total_tokens = sampling.max_episode_tokens
        self._constraints = constraints if constraints is not None else ConstraintCache()

    async def __call__(self, task: TaskSpec, group_id: str, start_version: int) -> Trajectory:
        if not isinstance(task, CurriculumTask):
            raise TypeError(f"expected a CurriculumTask, got {type(task).__name__}")
        episode = self._env.make_episode(
            task.task_id,
            EpisodeConfig(
                feedback=task.feedback,
                prompt_style=task.prompt_style,
                max_steps_per_turn=task.max_steps_per_turn,
            ),
        )
        try:
            async with self._publisher.use() as adapter:
                agent = AgentConfig(
                    sampling=self._sampling,
                    constrained=task.constrained,
                    max_total_tokens=self._max_total_tokens,
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
        finally:
            episode.close()


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
    """Validation on the held-out validation ids, greedy, with the current adapter."""

    async def validate() -> dict[str, float]:
        specs = scheduler.validation_tasks()
        if not specs:
            return {}
        first = specs[0]
        async with publisher.use() as adapter:
            settings = EvalSettings(
                feedback=first.feedback,
                prompt_style=first.prompt_style,
                max_steps_per_turn=first.max_steps_per_turn,
                constrained=first.constrained,
                max_new_tokens=sampling.max_new_tokens,
                max_total_tokens=sampling.max_episode_tokens,
                temperature=0.0,
                concurrency=concurrency,
                adapter=adapter.name if adapter is not None else None,
            )
            results = await evaluate_tasks(
                engine, env, chat, [s.task_id for s in specs], settings, constraints=constraints
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


@dataclass(frozen=True, slots=True)
class TrainerSettings:
    """What the learner actor needs from the run config."""

    groups_per_step: int
    """Kept groups per learner step."""
    max_staleness: int
    """Most policy versions a group may lag at the step that trains it."""
    max_steps: int = 0
    """Global cap on learner steps (0 = until the curriculum ends)."""
    checkpoint_every: int = 0
    """Checkpoint every this many steps (0 = only at the end)."""
    keep_checkpoints: int = 3
    """Complete checkpoints kept."""
    sample_every: int = 0
    """Write sample trajectories every this many steps (0 = never)."""
    sample_count: int = 2
    """Trajectories written per sampled step."""


class LearnerActor(Actor[TrajectoryGroup]):
    """The learner side of the run (see the module docstring)."""

    accepts = (TrajectoryGroup,)

    def __init__(
        self,
        learner: Learner,
        scheduler: CurriculumScheduler,
        publisher: AdapterPublisher,
        folder: RunFolder,
        settings: TrainerSettings,
        *,
        decode: Callable[[Sequence[int]], str],
        validate: Callable[[], Awaitable[dict[str, float]]] | None = None,
        on_step: Callable[[Mapping[str, Any]], None] | None = None,
        start_step: int = 0,
        mailbox_size: int | None = None,
        name: str = "learner",
    ) -> None:
        super().__init__(name, mailbox_size or max(2, 2 * settings.groups_per_step))
        self.learner = learner
        self.scheduler = scheduler
        self.publisher = publisher
        self.folder = folder
        self.settings = settings
        self._decode = decode
        self._validate = validate
        self._on_step = on_step
        self.step = start_step
        """Learner steps completed (including those before a resume)."""
        self.done = asyncio.Event()
        """Set when the curriculum or the step budget has ended (or ``finish`` was called)."""
        self._rollout: RolloutActor | None = None
        self._source: CurriculumTaskSource | None = None
        self._batch: list[TrajectoryGroup] = []
        self._last_checkpoint = start_step
        self._started = time.monotonic()
        self._last_time = self._started
        self._last_completed = 0
        self._last_tokens = 0
        self._discarded: dict[str, int] = {}

    def connect(self, rollout: RolloutActor, source: CurriculumTaskSource) -> None:
        """The rollout to notify of new versions and discarded groups, and the source to close."""
        self._rollout = rollout
        self._source = source

    def finish(self, reason: str) -> None:
        """End the run: no more dispatches, no more steps; groups still arriving are discarded."""
        if not self.done.is_set():
            log.info("training_finishing", reason=reason, step=self.step)
        self.done.set()
        if self._source is not None:
            self._source.close()

    # --- messages -------------------------------------------------------------------------------

    async def handle(self, message: TrajectoryGroup) -> None:
        match message:
            case TrajectoryGroup() as group:
                await self._receive(group)
            case _:
                raise TypeError(f"{self.name}: unexpected message {message!r}")

    async def _receive(self, group: TrajectoryGroup) -> None:
        if self.done.is_set():
            return  # the run is ending: nothing more is trained, and dispatch is over
        if not group.trajectories:
            await self._discard(1, "empty")
            return
        verdict = self.scheduler.record_group(GroupOutcome.from_trajectories(group.trajectories))
        if not verdict.keep:
            await self._discard(1, "zero_variance")
            return
        if self.learner.policy_version - group.start_version > self.settings.max_staleness:
            await self._discard(1, "stale")
            return
        self._batch.append(group)
        if len(self._batch) >= self.settings.groups_per_step:
            batch, self._batch = self._batch, []
            await self._train_step(batch)

    async def _discard(self, count: int, reason: str) -> None:
        self._discarded[reason] = self._discarded.get(reason, 0) + count
        await self._notify(GroupsDiscarded(count=count, reason=reason))

    async def _notify(self, message: PolicyUpdated | GroupsDiscarded) -> None:
        if self._rollout is None:
            return
        with contextlib.suppress(MailboxClosed):  # the rollout already stopped (run ending)
            await self._rollout.send(message)

    # --- one step -------------------------------------------------------------------------------

    async def _train_step(self, batch: list[TrajectoryGroup]) -> None:
        stage = self.scheduler.stage
        stage_name = self.scheduler.stage_config.name
        version_before = self.learner.policy_version
        trajectories = [t for g in batch for t in g.trajectories]
        metrics = await asyncio.to_thread(self.learner.step, trajectories)
        adapter = await self.publisher.publish(self.learner)
        await self._notify(PolicyUpdated(version=adapter.version))
        self.step += 1
        step_metrics: dict[str, float] = {
            f"learner/{k}": float(v) for k, v in metrics.as_dict().items() if isinstance(v, int | float)
        }
        step_metrics["rollout/group_staleness_mean"] = sum(
            version_before - g.start_version for g in batch
        ) / len(batch)
        validation: dict[str, float] = {}
        if self._validate is not None and self.scheduler.validation_due(self.step):
            validation = await self._validate()
        summary = self.scheduler.end_step(self.step, {**step_metrics, **validation})
        record: dict[str, Any] = {
            "step": self.step,
            "time_s": time.monotonic() - self._started,
            "stage": stage,
            "stage_name": stage_name,
            "policy_version": self.learner.policy_version,
            **step_metrics,
            **self._rollout_rates(),
            **{f"groups/discarded/{k}": v for k, v in self._discarded.items()},
            **summary.metrics,
            **validation,
        }
        self.folder.append_metrics(record)
        if summary.promotion is not None:
            self.folder.append_metrics(summary.promotion.to_record())
        self._write_samples(trajectories)
        if self.settings.checkpoint_every and self.step % self.settings.checkpoint_every == 0:
            await self.checkpoint()
        if self._on_step is not None:
            self._on_step(record)
        if self.scheduler.finished:
            self.finish("curriculum finished")
        elif self.settings.max_steps and self.step >= self.settings.max_steps:
            self.finish("step budget reached")

    def _rollout_rates(self) -> dict[str, float]:
        if self._rollout is None:
            return {}
        stats = self._rollout.statistics()
        now = time.monotonic()
        elapsed = max(now - self._last_time, 1e-9)
        rates = {
            "rollout/episodes_per_s": (stats.episodes_completed - self._last_completed) / elapsed,
            "rollout/tokens_per_s": (stats.generated_tokens - self._last_tokens) / elapsed,
            "rollout/episodes_completed": float(stats.episodes_completed),
            "rollout/episodes_dropped": float(stats.episodes_dropped),
            "rollout/in_flight": float(stats.in_flight),
        }
        self._last_time, self._last_completed, self._last_tokens = (
            now,
            stats.episodes_completed,
            stats.generated_tokens,
        )
        return rates

    def _write_samples(self, trajectories: Sequence[Trajectory]) -> None:
        every = self.settings.sample_every
        if not every or self.step % every:
            return
        records = []
        for t in trajectories[: self.settings.sample_count]:
            first = t.loss_mask.index(True) if True in t.loss_mask else len(t.token_ids)
            records.append(
                {
                    "step": self.step,
                    "task_id": t.task_id,
                    "group_id": t.group_id,
                    "stage": t.stage,
                    "start_version": t.start_version,
                    "reward": t.reward,
                    "progress": t.progress,
                    "format_reward": t.format_reward,
                    "tool_reward": t.tool_reward,
                    "turn_passed": list(t.turn_passed),
                    "step_codes": list(t.step_codes),
                    "truncated": t.truncated,
                    "prompt_tokens": first,
                    "model_tokens": t.num_model_tokens,
                    # The episode after the (long, tool-laden) system prompt, decoded for reading.
                    "episode_text": self._decode(t.token_ids[first:]),
                }
            )
        self.folder.append_trajectories(records)

    # --- checkpoints and stopping --------------------------------------------------------------------

    async def checkpoint(self) -> Path | None:
        """Write a complete checkpoint of the current step (no-op if it already exists)."""
        if self.step == 0 or self.step == self._last_checkpoint:
            return None
        state = {
            "curriculum": self.scheduler.state_dict(),
            "policy_version": self.learner.policy_version,
        }

        def write(folder: Path) -> None:
            torch.save(self.learner.state_dict(), folder / LEARNER_STATE_FILE)
            self.learner.save_adapter(folder / ADAPTER_DIR)

        path = await asyncio.to_thread(self.folder.save_checkpoint, self.step, state, write)
        await asyncio.to_thread(self.folder.prune_checkpoints, self.settings.keep_checkpoints)
        self._last_checkpoint = self.step
        return path

    async def on_stop(self, reason: str) -> None:
        """The queue is drained (partial batches are not trained); leave a checkpoint behind."""
        if self._batch:
            log.info("learner_partial_batch_dropped", groups=len(self._batch), step=self.step)
            self._batch = []
        await self.checkpoint()


def restore(
    learner: Learner, scheduler: CurriculumScheduler, checkpoint_path: Path, state: Mapping[str, Any]
) -> None:
    """Load a checkpoint's learner and curriculum state (the adapter is published by the caller)."""
    learner_state = torch.load(checkpoint_path / LEARNER_STATE_FILE, map_location="cpu", weights_only=True)
    learner.load_state_dict(learner_state)
    scheduler.load_state_dict(state["curriculum"])
