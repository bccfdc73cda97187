"""The learner side of a training run: an actor between the trajectory queue and the ``Learner``.

``LearnerActor`` (named ``learner``; its mailbox is the trajectory queue) takes finished groups, lets
the scheduler count them (zero-variance groups dropped or kept by the stage's config), drops groups
too stale to train (the rollout's one staleness rule), and every ``groups_per_step`` kept groups runs
one learner step (in a thread), publishes the adapter, tells the rollout the new policy version,
validates when due, closes the curriculum step (maybe a promotion), writes the step's metrics
(through the run's metric sinks) and the episodes it received (the trajectory log: trained and
discarded groups alike), checkpoints, and rewrites the report after a validation or a checkpoint.
Every group it receives ends trained or discarded with a ``DropReason``, and a discarded group gives
its admission slot back to the rollout's gate. When the curriculum or the step budget ends it sets
``done``. When the engines are gone (an adapter cannot be published within the client's outage
limit, or validation finds no engine), the step that was trained is kept, ``failure`` records why
and the run ends in order: the checkpoint on the way out holds that step, and a resume publishes
its adapter.

Left out: building engines and the process around the run (``training.py``, ``cli``), the episode
loop (``agents``), the learning rule (``optim``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import structlog
import torch
from envtune.agents.engine import EngineUnavailable
from envtune.optim.learner import PolicyLearner
from envtune.runtime.actors import Actor, MailboxClosed
from envtune.runtime.metrics import RateMeter
from envtune.runtime.recipe.config import RunConfig
from envtune.runtime.recipe.curriculum import CurriculumScheduler, GroupOutcome
from envtune.runtime.recipe.episodes import CurriculumTaskSource
from envtune.runtime.recipe.learner_masks import BatchMasks
from envtune.runtime.recipe.report import write_report
from envtune.runtime.recipe.run_folder import RunFolder
from envtune.runtime.recipe.sinks import MetricSinks
from envtune.runtime.recipe.trajectory_log import EpisodeRecord, TrajectoryLog
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
        learner: PolicyLearner,
        scheduler: CurriculumScheduler,
        publisher: AdapterPublisher,
        folder: RunFolder,
        rollout_config: RolloutConfig,
        run_config: RunConfig,
        *,
        sinks: MetricSinks,
        trajectory_log: TrajectoryLog | None = None,
        category_of: Callable[[str], str] = lambda task_id: "",
        live_report: bool = True,
        validate: Callable[[], Awaitable[dict[str, float]]] | None = None,
        on_step: Callable[[Mapping[str, Any]], None] | None = None,
        masks: BatchMasks | None = None,
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
        self.sinks = sinks
        self.trajectory_log = trajectory_log
        self._category_of = category_of
        self._live_report = live_report
        self._to_log: list[EpisodeRecord] = []
        self._validate = validate
        self._on_step = on_step
        self._masks = masks
        """Replays the grammar masks of constrained replies (None: the run samples unconstrained)."""
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
            await self._discard(group, DropReason.RUN_ENDING)  # nothing more is trained
            return
        if not group.trajectories:
            await self._discard(group, DropReason.EMPTY)
            return
        verdict = self.scheduler.record_group(GroupOutcome.from_trajectories(group.trajectories))
        if not verdict.keep:
            await self._discard(group, DropReason.ZERO_VARIANCE)
            return
        if is_stale(group.start_version, self.learner.policy_version, self.rollout_config.max_staleness):
            await self._discard(group, DropReason.STALE)
            return
        self._batch.append(group)
        if len(self._batch) >= self.rollout_config.groups_per_step:
            batch, self._batch = self._batch, []
            await self._train_step(batch)

    async def _discard(self, group: TrajectoryGroup, reason: DropReason) -> None:
        self._log_groups([group], reason)
        self._discarded[reason] += 1
        await self._notify(GroupsDiscarded(count=1, reason=reason))

    def _log_groups(self, groups: list[TrajectoryGroup], reason: DropReason | None) -> None:
        """Queue the groups' episodes for the trajectory log (written at the end of the step)."""
        if self.trajectory_log is None:
            return
        drop = reason.value if reason is not None else None
        self._to_log.extend(
            EpisodeRecord(t, self._category_of(t.task_id), drop) for g in groups for t in g.trajectories
        )

    async def _flush_trajectories(self) -> None:
        if self.trajectory_log is not None and self._to_log:
            records, self._to_log = self._to_log, []
            # A thread: a paper-sized step is hundreds of episodes of JSON, too long to hold the loop.
            await asyncio.to_thread(self.trajectory_log.write_step, self.step, records)

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
        token_masks = self._masks.source(trajectories) if self._masks is not None else None
        if token_masks is None and any(t.constrained for t in trajectories):
            raise RuntimeError("constrained trajectories reached a learner built without mask replay")
        metrics = await asyncio.to_thread(self.learner.step, trajectories, token_masks=token_masks)
        if not metrics.updated:
            log.warning("learner_step_not_applied", step=self.step + 1, reason=str(metrics.skip_reason))
            # The weights did not move, so the version did not either: these groups were consumed
            # without a step, and the gate must get their slots back or dispatch stalls for good.
            self._discarded[DropReason.NOT_TRAINED] += len(batch)
            await self._notify(GroupsDiscarded(count=len(batch), reason=DropReason.NOT_TRAINED))
        self._log_groups(batch, None if metrics.updated else DropReason.NOT_TRAINED)
        adapter = await self._publish()
        if adapter is not None:
            await self._notify(PolicyUpdated(version=adapter.version))
        self.step += 1
        step_metrics: dict[str, float] = {
            f"learner/{k}": float(v) for k, v in metrics.as_dict().items() if isinstance(v, int | float)
        }
        if metrics.skip_reason is not None:
            step_metrics["learner/skipped"] = 1.0
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
        self.sinks.write_step(record)
        if summary.promotion is not None:
            record_event = summary.promotion.to_record()
            if summary.promotion.to_stage is not None:
                # kl_reference = stage_start: the next stage is anchored to the policy it starts from.
                snapshot = await asyncio.to_thread(self.learner.snapshot_reference)
                record_event["kl_reference_version"] = self.learner.policy_version if snapshot else None
            self.sinks.write_event(record_event)
        await self._flush_trajectories()
        checkpointed = False
        if self.run_config.checkpoint_every and self.step % self.run_config.checkpoint_every == 0:
            checkpointed = await self.checkpoint() is not None
        if validation or checkpointed:
            await self.refresh_report()
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
            "rollout/episodes_aborted": float(stats.episodes_aborted),
            "rollout/tokens_saved_estimate": stats.tokens_saved_estimate,
        }

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

    async def refresh_report(self) -> None:
        """Rewrite the run report from what ``metrics.jsonl`` holds now (a thread: plots take a moment).

        A report that fails (a plotting bug, a full disk) is logged, never allowed to end the run."""
        if not self._live_report:
            return
        started = time.perf_counter()
        try:
            await asyncio.to_thread(write_report, self.folder)
        except Exception as exc:  # the report is a view of the run, not part of it
            log.warning("report_failed", error=repr(exc), step=self.step)
            return
        log.debug("report_refreshed", step=self.step, seconds=time.perf_counter() - started)

    async def on_stop(self, reason: str) -> None:
        """The queue is drained (partial batches are not trained); leave a checkpoint behind."""
        if self._batch:
            log.info("learner_partial_batch_dropped", groups=len(self._batch), step=self.step)
            self._discarded[DropReason.RUN_ENDING] += len(self._batch)
            self._log_groups(self._batch, DropReason.RUN_ENDING)
            self._batch = []
        await self._flush_trajectories()
        await self.checkpoint()


def restore(
    learner: PolicyLearner, scheduler: CurriculumScheduler, checkpoint_path: Path, state: Mapping[str, Any]
) -> None:
    """Load a checkpoint's learner and curriculum state (the adapter is published by the caller)."""
    learner_state = torch.load(checkpoint_path / LEARNER_STATE_FILE, map_location="cpu", weights_only=True)
    learner.load_state_dict(learner_state)
    scheduler.load_state_dict(state["curriculum"])
