"""The learner side of a training run: an actor between the trajectory queue and the ``Learner``.

``LearnerActor`` (named ``learner``; its mailbox is the trajectory queue) takes finished groups, lets
the scheduler count them (zero-variance groups dropped or kept by the stage's config), drops groups
too stale to train (the rollout's one staleness rule), and every ``groups_per_step`` kept groups runs
one learner step (in a thread), publishes the adapter, tells the rollout the new policy version,
validates when due, closes the curriculum step (maybe a promotion), writes the step's metrics and
sample trajectories, and checkpoints. Every group it receives ends trained or discarded with a
``DropReason``, and a discarded group gives its admission slot back to the rollout's gate. When the
curriculum or the step budget ends it sets ``done``. When the engines are gone (an adapter cannot be
published within the client's outage limit, or validation finds no engine), the step that was
trained is kept, ``failure`` records why and the run ends in order: the checkpoint on the way out
holds that step, and a resume publishes its adapter.

Left out: building engines and the process around the run (``training.py``, ``cli``), the episode
loop (``agents``), the learning rule (``optim``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog
import torch
from envtune.agents.engine import EngineUnavailable
from envtune.agents.trajectory import Trajectory
from envtune.optim.learner import Learner
from envtune.runtime.actors import Actor, MailboxClosed
from envtune.runtime.metrics import RateMeter
from envtune.runtime.recipe.config import RunConfig
from envtune.runtime.recipe.curriculum import CurriculumScheduler, GroupOutcome
from envtune.runtime.recipe.episodes import CurriculumTaskSource
from envtune.runtime.recipe.run_folder import RunFolder
from envtune.runtime.records import DropReason, GroupsDiscarded, PolicyUpdated, TrajectoryGroup, is_stale
from envtune.runtime.rollout import RolloutActor, RolloutConfig
from envtune.runtime.weight_sync import AdapterPublisher, PublishedAdapter, WeightSyncError

log = structlog.get_logger(__name__)

LEARNER_STATE_FILE = "learner.pt"
"""The learner's state (adapter, optimizer, counters, RNG) inside a checkpoint."""
ADAPTER_DIR = "adapter"
"""The adapter in peft layout inside a checkpoint (loadable by SGLang and ``envtune-eval``)."""


class LearnerActor(Actor[TrajectoryGroup]):
    """The learner side of the run (see the module docstring)."""

    accepts = (TrajectoryGroup,)

    def __init__(
        self,
        learner: Learner,
        scheduler: CurriculumScheduler,
        publisher: AdapterPublisher,
        folder: RunFolder,
        rollout_config: RolloutConfig,
        run_config: RunConfig,
        *,
        decode: Callable[[Sequence[int]], str],
        validate: Callable[[], Awaitable[dict[str, float]]] | None = None,
        on_step: Callable[[Mapping[str, Any]], None] | None = None,
        start_step: int = 0,
        mailbox_size: int | None = None,
        name: str = "learner",
    ) -> None:
        super().__init__(name, mailbox_size or max(2, 2 * rollout_config.groups_per_step))
        self.learner = learner
        self.scheduler = scheduler
        self.publisher = publisher
        self.folder = folder
        self.rollout_config = rollout_config
        self.run_config = run_config
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
        self._rates = RateMeter()
        self._discarded: Counter[DropReason] = Counter()
        self.failure: Exception | None = None
        """Why the run is ending early (the engines are gone), or None."""

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
            await self._discard(1, DropReason.RUN_ENDING)  # nothing more is trained
            return
        if not group.trajectories:
            await self._discard(1, DropReason.EMPTY)
            return
        verdict = self.scheduler.record_group(GroupOutcome.from_trajectories(group.trajectories))
        if not verdict.keep:
            await self._discard(1, DropReason.ZERO_VARIANCE)
            return
        if is_stale(group.start_version, self.learner.policy_version, self.rollout_config.max_staleness):
            await self._discard(1, DropReason.STALE)
            return
        self._batch.append(group)
        if len(self._batch) >= self.rollout_config.groups_per_step:
            batch, self._batch = self._batch, []
            await self._train_step(batch)

    async def _discard(self, count: int, reason: DropReason) -> None:
        self._discarded[reason] += count
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
        if not metrics.updated:
            # The weights did not move, so the version did not either: these groups were consumed
            # without a step, and the gate must get their slots back or dispatch stalls for good.
            await self._discard(len(batch), DropReason.NOT_TRAINED)
        adapter = await self._publish()
        if adapter is not None:
            await self._notify(PolicyUpdated(version=adapter.version))
        self.step += 1
        step_metrics: dict[str, float] = {
            f"learner/{k}": float(v) for k, v in metrics.as_dict().items() if isinstance(v, int | float)
        }
        step_metrics["rollout/group_staleness_mean"] = sum(
            version_before - g.start_version for g in batch
        ) / len(batch)
        validation: dict[str, float] = {}
        if self._validate is not None and self.failure is None and self.scheduler.validation_due(self.step):
            try:
                validation = await self._validate()
            except EngineUnavailable as exc:
                self._fail(exc)
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
        if self.run_config.checkpoint_every and self.step % self.run_config.checkpoint_every == 0:
            await self.checkpoint()
        if self._on_step is not None:
            self._on_step(record)
        if self.scheduler.finished:
            self.finish("curriculum finished")
        elif self.run_config.max_steps and self.step >= self.run_config.max_steps:
            self.finish("step budget reached")

    async def _publish(self) -> PublishedAdapter | None:
        try:
            return await self.publisher.publish(self.learner)
        except WeightSyncError as exc:
            self._fail(exc)
            return None

    def _fail(self, error: Exception) -> None:
        if self.failure is None:
            self.failure = error
            log.error("training_failed", error=str(error), step=self.step)
        self.finish(f"failed: {error}")

    def _rollout_rates(self) -> dict[str, float]:
        if self._rollout is None:
            return {}
        stats = self._rollout.statistics()
        episodes_per_s, tokens_per_s = self._rates.rates(stats, time.monotonic())
        return {
            "rollout/episodes_per_s": episodes_per_s,
            "rollout/tokens_per_s": tokens_per_s,
            "rollout/episodes_completed": float(stats.episodes_completed),
            "rollout/episodes_dropped": float(stats.episodes_dropped),
            "rollout/in_flight": float(stats.in_flight),
        }

    def _write_samples(self, trajectories: Sequence[Trajectory]) -> None:
        every = self.run_config.sample_trajectories_every
        if not every or self.step % every:
            return
        records = []
        for t in trajectories[: self.run_config.sample_trajectories_count]:
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
            # Through a Python file: a full disk then raises OSError(ENOSPC), where torch's own
            # writer would say "basic_ios::clear: iostream error".
            with (folder / LEARNER_STATE_FILE).open("wb") as handle:
                torch.save(self.learner.state_dict(), handle)
            self.learner.save_adapter(folder / ADAPTER_DIR)

        path = await asyncio.to_thread(self.folder.save_checkpoint, self.step, state, write)
        await asyncio.to_thread(self.folder.prune_checkpoints, self.run_config.keep_checkpoints)
        self._last_checkpoint = self.step
        return path

    async def on_stop(self, reason: str) -> None:
        """The queue is drained (partial batches are not trained); leave a checkpoint behind."""
        if self._batch:
            log.info("learner_partial_batch_dropped", groups=len(self._batch), step=self.step)
            self._discarded[DropReason.RUN_ENDING] += len(self._batch)
            self._batch = []
        await self.checkpoint()


def restore(
    learner: Learner, scheduler: CurriculumScheduler, checkpoint_path: Path, state: Mapping[str, Any]
) -> None:
    """Load a checkpoint's learner and curriculum state (the adapter is published by the caller)."""
    learner_state = torch.load(checkpoint_path / LEARNER_STATE_FILE, map_location="cpu", weights_only=True)
    learner.load_state_dict(learner_state)
    scheduler.load_state_dict(state["curriculum"])
