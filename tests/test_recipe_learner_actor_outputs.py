"""The learner actor's outputs: metrics through the sinks, every received episode in the trajectory
log (trained and discarded), checkpoints, and the report rewritten after a checkpoint.

The learner and the adapter publisher are stand-ins (no torch step, no engine): what is under test
is the actor's bookkeeping, with the real curriculum scheduler, run folder, sinks and log.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envtune.agents.trajectory import Reply, Trajectory, Transcript
from envtune.environments import BfclEnvironment, EpisodeConfig
from envtune.environments.tool_calls import ANSWER_REPLY
from envtune.runtime.recipe.config import CurriculumConfig, PromotionConfig, RunConfig, StageConfig
from envtune.runtime.recipe.curriculum import CurriculumScheduler
from envtune.runtime.recipe.learner_actor import LearnerActor
from envtune.runtime.recipe.run_folder import RunFolder
from envtune.runtime.recipe.sinks import open_sinks
from envtune.runtime.recipe.trajectory_log import SampleMode, TrajectoryLog, TrajectorySampling, read_records
from envtune.runtime.records import TrajectoryGroup
from envtune.runtime.rollout import RolloutConfig


@dataclass
class _Metrics:
    updated: bool = True
    skip_reason: None = None

    def as_dict(self) -> dict[str, float | int | bool]:
        return {"updated": self.updated, "loss": 0.5, "num_loss_tokens": 12}


class FakeLearner:
    """Counts steps; every step is an update."""

    def __init__(self) -> None:
        self.policy_version = 0
        self.batches: list[list[Trajectory]] = []

    def step(self, trajectories: list[Trajectory], *, token_masks: object = None) -> _Metrics:
        self.batches.append(list(trajectories))
        self.policy_version += 1
        return _Metrics()

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.policy_version}

    def save_adapter(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text("{}")


@dataclass(frozen=True)
class _Published:
    version: int


class FakePublisher:
    async def publish(self, learner: FakeLearner) -> _Published:
        return _Published(learner.policy_version)


def _episode(env: BfclEnvironment, task_id: str, group_id: str, reward: float) -> Trajectory:
    """A real (one-reply) BFCL transcript with a chosen reward."""
    episode = env.make_episode(task_id, EpisodeConfig())
    opening = episode.start()
    result = episode.step(ANSWER_REPLY)
    n = 8
    return Trajectory(
        task_id=task_id,
        group_id=group_id,
        token_ids=tuple(range(n)),
        loss_mask=(False,) * 4 + (True,) * 4,
        behavior_logprobs=(0.0,) * n,
        policy_versions=(-1,) * 4 + (0,) * 4,
        reward=reward,
        progress=reward,
        format_reward=1.0,
        tool_reward=0.0,
        turn_passed=(False,),
        step_codes=(int(result.code),),
        stage=1,
        start_version=0,
        transcript=Transcript.of(opening, (Reply.of(ANSWER_REPLY, result),)),
    )


def _group(env: BfclEnvironment, task_id: str, name: str, rewards: tuple[float, ...]) -> TrajectoryGroup:
    members = tuple(_episode(env, task_id, name, r) for r in rewards)
    return TrajectoryGroup(name, task_id, 0, members, len(members), 0)


async def test_metrics_trajectories_checkpoint_and_live_report(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = BfclEnvironment()
    stage = StageConfig(name="only", zero_variance="drop", promotion=PromotionConfig(max_steps=3))
    scheduler = CurriculumScheduler(CurriculumConfig(stages=(stage,), validation_every=0))
    folder = RunFolder.create(tmp_path, "actor")
    sinks = open_sinks(folder.path, ["tensorboard"], config={"run": {"name": "actor"}}, run_name="actor")
    log = TrajectoryLog(folder.trajectories_path, TrajectorySampling(SampleMode.ALL))
    learner = FakeLearner()
    actor = LearnerActor(
        learner,  # type: ignore[arg-type]
        scheduler,
        FakePublisher(),  # type: ignore[arg-type]
        folder,
        RolloutConfig(group_size=2, groups_per_step=2, max_staleness=1),
        RunConfig(checkpoint_every=1),
        sinks=sinks,
        trajectory_log=log,
        category_of=lambda task_id: env.tasks[task_id].category,
    )
    task = "multi_turn_base_0"
    try:
        await actor.handle(_group(env, task, "g-zero", (0.0, 0.0)))  # zero variance: dropped
        await actor.handle(_group(env, task, "g-a", (0.0, 1.0)))
        assert actor.step == 0 and not folder.trajectories_path.exists()  # logged when the step ends
        await actor.handle(_group(env, task, "g-b", (1.0, 0.0)))  # second kept group: a step
        assert actor.step == 1 and len(learner.batches) == 1
        await actor.handle(_group(env, task, "g-c", (0.5, 0.0)))  # waits in the partial batch
        await actor.on_stop("test")  # the partial batch is dropped as the run ends
    finally:
        sinks.close()

    records = read_records(folder.trajectories_path)
    assert [(r["group_id"], r["drop_reason"], r["step"]) for r in records] == [
        ("g-zero", "zero_variance", 1),
        ("g-zero", "zero_variance", 1),
        ("g-a", None, 1),
        ("g-a", None, 1),
        ("g-b", None, 1),
        ("g-b", None, 1),
        ("g-c", "run_ending", 1),
        ("g-c", "run_ending", 1),
    ]
    assert all(r["category"] == "base" for r in records)
    first = records[2]
    assert [m["role"] for m in first["messages"][:2]] == ["system", "user"]
    assert first["messages"][2] == {
        "role": "assistant",
        "content": ANSWER_REPLY,
        "tool_calls": None,
        "step_code": first["step_codes"][0],
    }
    # Metrics: metrics.jsonl and TensorBoard got the same step.
    (step,) = [r for r in folder.read_metrics() if "event" not in r]
    assert step["learner/loss"] == 0.5 and step["groups/discarded/zero_variance"] == 1
    accumulator = EventAccumulator(str(folder.path / "tensorboard"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"learner/loss", "train/reward", "curriculum/stage"} <= tags
    assert [e.value for e in accumulator.Scalars("learner/loss")] == [0.5]
    # The step's checkpoint rewrote the report while the run was going.
    assert (folder.path / "checkpoints" / "step-000001" / "COMPLETE").exists()
    page = (folder.report_dir / "index.html").read_text()
    assert "1 learner steps logged" in page and (folder.report_dir / "learner.png").exists()
