"""The run's own machinery learns: ``train()`` with the real actors on the toy probe, against a control.

``recipe.training.train`` runs exactly as ``envtune-run`` does (rollout actor, staleness gate with
eta = 1, learner actor, curriculum scheduler with a promotion, adapters published into the embedded
engine and pinned per group, grammar masks replayed in the learner, KL 0.1 to the stage-start
policy), with two parts swapped for the probe: ``ToyEnvironment`` plays the episodes (the user names a
tool; reward for calling exactly it, ``runtime/testing/toy_env.py``) and the scheduler draws from toy
task ids. Every prompt names ``cd`` (three phrasings), so a random model starts near a quarter.

The control arm is the same run with ``ShuffledRewards``: each batch's rewards permuted across its
trajectories inside the learner step (same tokens, cost and reward spread, no relation to the
samples). Both arms run side by side (one arm's sampling overlaps the other's learner step on 2
cores). Learning is read from ``train/progress`` (1 iff the named tool was called), which both stages
log whatever they train on: stage ``a`` trains on the stage-1 reward for 4 steps, then the budget
promotes to stage ``b`` (progress reward).

Sampling seeds are not fixed (the engine draws them), so the margins are wide: measured on this
machine (seeds of 5 runs), trained 0.2-0.3 -> 0.7-0.9 over 12 steps, control within +-0.1 of its
start. A trained arm that ends below its own start + ``MARGIN`` or the control's end + ``MARGIN``
did not learn.
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from envtune.agents.grammar import GrammarOptions
from envtune.environments.types import RewardKind
from envtune.optim.config import LoraSettings
from envtune.runtime.engines.embedded import EmbeddedEngine
from envtune.runtime.engines.settings import EmbeddedEngineConfig
from envtune.runtime.recipe.config import (
    Config,
    CurriculumConfig,
    PromotionConfig,
    RunConfig,
    StageConfig,
)
from envtune.runtime.recipe.curriculum import CurriculumScheduler
from envtune.runtime.recipe.run_folder import RunFolder
from envtune.runtime.recipe.training import train
from envtune.runtime.rollout import RolloutConfig
from envtune.runtime.testing.controls import ShuffledRewards
from envtune.runtime.testing.toy_env import ToyEnvironment, toy_curriculum_data

STEPS = 12
"""Learner steps per arm."""
QUARTER = 3
"""Steps at each end of the curve compared."""
MARGIN = 0.2
"""How far the trained arm must end above its start and above the control's end."""
SEEDS = (0, 4, 8, 12)
"""Toy tasks: all name ``cd``."""


def config() -> Config:
    stage = StageConfig(
        name="a",
        reward=RewardKind.STAGE1,
        data="train",
        categories=("base",),
        constrained=True,
        zero_variance="keep",
        promotion=PromotionConfig(max_steps=4),
    )
    second = replace(stage, name="b", reward=RewardKind.PROGRESS, promotion=PromotionConfig(max_steps=99))
    stages = (stage, second)
    base = Config()
    return replace(
        base,
        sampling=replace(base.sampling, max_new_tokens=64, max_episode_tokens=256),
        grammar=GrammarOptions(
            max_think_chars=0, allow_answer=False, max_calls=1, any_whitespace=False, any_order=False
        ),
        rollout=RolloutConfig(group_size=8, groups_per_step=4, max_staleness=1, max_concurrent_episodes=32),
        learner=replace(base.learner, lr=1e-2, lora=LoraSettings(rank=4, alpha=8.0)),  # KL 0.1: default
        curriculum=CurriculumConfig(stages=stages, validation_every=0),
        run=RunConfig(
            max_steps=STEPS, checkpoint_every=0, progress_bar=False,
            no_progress_timeout_s=600,
        ),
    )  # fmt: skip


async def run_arm(model_dir: Path, root: Path, *, control: bool) -> list[dict[str, Any]]:
    cfg = config()
    split, tasks = toy_curriculum_data(SEEDS)
    scheduler = CurriculumScheduler(cfg.curriculum, split=split, tasks=tasks)
    folder = RunFolder.create(root, "control" if control else "trained")
    settings = EmbeddedEngineConfig(device="cpu", max_batch_rows=32)
    async with await EmbeddedEngine.open(model_dir, settings) as engine:
        steps = await train(
            cfg, folder, engine, engine, model_dir,
            env=ToyEnvironment(), scheduler=scheduler,
            wrap_learner=(lambda learner: ShuffledRewards(learner, seed=1)) if control else None,  # type: ignore[arg-type,return-value]
        )  # fmt: skip
    assert steps == STEPS
    return folder.read_metrics()


async def both_arms(model_dir: Path, root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    async with asyncio.TaskGroup() as tg:
        trained = tg.create_task(run_arm(model_dir, root, control=False))
        control = tg.create_task(run_arm(model_dir, root, control=True))
    return trained.result(), control.result()


def curve(records: list[dict[str, Any]]) -> list[float]:
    return [r["train/progress"] for r in records if "event" not in r and "train/progress" in r]


@pytest.mark.filterwarnings("ignore:Adapter policy-v:UserWarning")  # peft, when a version is retired
def test_train_learns_through_the_actors_beyond_a_shuffled_reward_control(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    trained, control = asyncio.run(both_arms(tiny_model_dir, tmp_path))
    steps = [r for r in trained if "event" not in r]
    up, flat = curve(trained), curve(control)
    report = f"trained {[round(x, 2) for x in up]} control {[round(x, 2) for x in flat]}"
    assert len(steps) == STEPS and len(up) >= STEPS - 1, report
    start, end = statistics.fmean(up[:QUARTER]), statistics.fmean(up[-QUARTER:])
    control_end = statistics.fmean(flat[-QUARTER:])
    assert end - start > MARGIN, report
    assert end - control_end > MARGIN, report
    # The machinery it went through:
    promotion = next(r for r in trained if r.get("event") == "promotion")
    assert (promotion["from_name"], promotion["to_name"], promotion["reason"]) == ("a", "b", "budget")
    assert promotion["kl_reference_version"] == 4  # the KL anchor moved to the stage's start
    assert [r["stage_name"] for r in steps] == ["a"] * 4 + ["b"] * (STEPS - 4)
    assert steps[-1]["policy_version"] == STEPS  # every step published a new adapter
    assert all(r["learner/staleness_max"] <= 1 for r in steps)  # eta = 1
    assert all(0.5 < r["learner/behavior_weight_mean"] <= 2.0 for r in steps)  # masks replayed
    assert all(r["learner/constrained_fraction"] == 1.0 for r in steps)
    assert max(r["learner/kl_ref"] for r in steps) > 0  # the KL term was on
