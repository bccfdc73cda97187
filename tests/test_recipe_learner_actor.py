"""The learner actor with the real rollout actor, staleness gate, curriculum and adapter publisher,
and a stub learner: every group ends trained or discarded, steps that do not update never stall the
gate, and a run that stops progressing fails with a checkpoint instead of hanging.

The stub learner replaces only the torch part (``Learner.step``, ``save_adapter``, ``state_dict``);
everything around it is the code a training run executes (``training.run_actors`` included).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from envtune.agents.trajectory import Trajectory
from envtune.optim.learner import SkipReason
from envtune.runtime.recipe.config import CurriculumConfig, PromotionConfig, RunConfig, StageConfig
from envtune.runtime.recipe.curriculum import CurriculumScheduler, CurriculumTask
from envtune.runtime.recipe.episodes import CurriculumTaskSource
from envtune.runtime.recipe.learner_actor import LearnerActor
from envtune.runtime.recipe.run_folder import RunFolder
from envtune.runtime.recipe.sinks import open_sinks
from envtune.runtime.recipe.training import run_actors
from envtune.runtime.records import DropReason
from envtune.runtime.rollout import RolloutActor, RolloutConfig
from envtune.runtime.supervisor import Supervisor
from envtune.runtime.watchdog import NoProgressError
from envtune.runtime.weight_sync import AdapterPublisher


@dataclass(frozen=True)
class StubMetrics:
    updated: bool
    policy_version: int
    skip_reason: SkipReason | None
    grad_norm: float

    def as_dict(self) -> dict[str, Any]:
        return {"updated": self.updated, "policy_version": self.policy_version, "grad_norm": self.grad_norm}


class StubLearner:
    """Bumps the version on every call except those in ``skip`` (1-based), like a NaN gradient."""

    def __init__(self, skip: set[int]) -> None:
        self.skip = skip
        self.policy_version = 0
        self.calls = 0
        self.trained_lags: list[int] = []
        self.snapshots = 0

    def step(self, trajectories: Sequence[Trajectory], *, token_masks: object = None) -> StubMetrics:
        self.calls += 1
        if self.calls in self.skip:
            return StubMetrics(False, self.policy_version, SkipReason.NON_FINITE_GRAD, float("nan"))
        self.trained_lags += [self.policy_version - t.start_version for t in trajectories]
        self.policy_version += 1
        return StubMetrics(True, self.policy_version, None, 0.5)

    def save_adapter(self, folder: Path) -> int:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text("{}")
        return self.policy_version

    def state_dict(self) -> dict[str, Any]:
        return {"policy_version": self.policy_version}

    def snapshot_reference(self) -> bool:
        self.snapshots += 1
        return True


class Runner:
    """A trivial episode: a few sampled tokens after a short random wait; hangs once ``hang`` is set."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.hang = asyncio.Event()

    async def __call__(self, task: CurriculumTask, group_id: str, start_version: int) -> Trajectory:
        await asyncio.sleep(self.rng.choice([0.001, 0.002, 0.005, 0.02]))
        if self.hang.is_set():
            await asyncio.Event().wait()  # an engine that stopped answering
        return Trajectory(
            task_id=task.task_id, group_id=group_id, token_ids=(1, 2, 3), loss_mask=(False, True, True),
            behavior_logprobs=(0.0, -1.0, -1.0), policy_versions=(-1, start_version, start_version),
            reward=self.rng.random(), progress=0.0, format_reward=1.0, tool_reward=1.0, turn_passed=(),
            step_codes=(), stage=task.stage, start_version=start_version,
        )  # fmt: skip


def build(
    tmp_path: Path,
    learner: StubLearner,
    runner: Runner,
    *,
    eta: int,
    max_steps: int,
    checkpoint_every: int = 0,
) -> tuple[Supervisor, LearnerActor, RolloutActor, RunFolder]:
    stages = tuple(
        StageConfig(
            name=name, categories=("base",), zero_variance="keep", promotion=PromotionConfig(max_steps=budget)
        )
        for name, budget in (("a", 3), ("b", 999))
    )
    scheduler = CurriculumScheduler(CurriculumConfig(stages=stages, validation_every=0))
    folder = RunFolder.create(tmp_path, "t")
    rollout_config = RolloutConfig(
        group_size=2, groups_per_step=4, max_staleness=eta, max_concurrent_episodes=6
    )
    run_config = RunConfig(
        max_steps=max_steps,
        checkpoint_every=checkpoint_every,
        progress_bar=False,
    )
    publisher = AdapterPublisher(tmp_path / "adapters", [])
    learner_actor = LearnerActor(
        learner,  # type: ignore[arg-type]
        scheduler, publisher, folder, rollout_config, run_config,
        sinks=open_sinks(folder.path, [], config={}, run_name="stub"), live_report=False,
    )  # fmt: skip
    source = CurriculumTaskSource(scheduler)
    rollout = RolloutActor(rollout_config, source, runner, learner_actor)
    learner_actor.connect(rollout, source)
    return Supervisor([rollout, learner_actor], stop_timeout_s=30), learner_actor, rollout, folder


@pytest.mark.parametrize(("eta", "skip"), [(1, {3, 4}), (2, {3, 5, 8}), (0, {2}), (1, {1, 2, 3, 7, 8})])
async def test_steps_that_do_not_update_never_stall_the_gate(
    tmp_path: Path, eta: int, skip: set[int]
) -> None:
    """Issue 10 (1): with the old accounting (no NOT_TRAINED discard) these stall at steps 4, 8, 2, 2."""
    learner, runner = StubLearner(skip), Runner()
    supervisor, actor, rollout, folder = build(tmp_path, learner, runner, eta=eta, max_steps=16)
    async with asyncio.timeout(60):  # a stall shows up as the watchdog's error well before this
        await run_actors(supervisor, actor, rollout, folder, asyncio.Event(), no_progress_timeout_s=5.0)
    assert actor.step == 16 and learner.calls == 16
    assert learner.policy_version == 16 - len(skip)
    assert max(learner.trained_lags) <= eta  # the staleness bound still holds
    stats = rollout.statistics()
    discarded = actor._discarded  # every group consumed by a skipped step went back to the gate
    assert discarded[DropReason.NOT_TRAINED] == 4 * len(skip)
    assert stats.in_flight == 0
    assert learner.snapshots == 1  # the promotion a -> b anchored the KL to the stage start
    records = folder.read_metrics()
    assert sum(1 for r in records if r.get("learner/skipped")) == len(skip)
    promotion = next(r for r in records if r.get("event") == "promotion")
    assert promotion["reason"] == "budget" and promotion["kl_reference_version"] is not None


async def test_a_run_without_progress_fails_with_a_checkpoint(tmp_path: Path) -> None:
    learner, runner = StubLearner(set()), Runner()
    supervisor, actor, rollout, folder = build(
        tmp_path, learner, runner, eta=1, max_steps=100, checkpoint_every=100
    )

    async def hang_after_two_steps() -> None:
        while actor.step < 2:
            await asyncio.sleep(0.001)
        runner.hang.set()

    async with asyncio.timeout(60), asyncio.TaskGroup() as tg:
        tg.create_task(hang_after_two_steps())
        with pytest.raises(NoProgressError) as info:
            await run_actors(supervisor, actor, rollout, folder, asyncio.Event(), no_progress_timeout_s=1.0)
    message = str(info.value)
    assert "no learner step for" in message and "episodes running" in message
    assert info.value.progress in (2, 3)  # a step may complete from groups already finished
    checkpoint = folder.latest_complete_checkpoint()
    assert checkpoint is not None and checkpoint.step == actor.step  # written on the way out
    failed = [r for r in folder.read_metrics() if r.get("event") == "run_failed"]
    assert len(failed) == 1 and failed[0]["reason"] == "no_progress"
    assert rollout.statistics().dropped_by_reason[DropReason.CANCELLED] > 0  # the hung episodes
