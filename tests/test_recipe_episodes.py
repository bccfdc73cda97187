"""``CurriculumEpisodes``: a training episode plays under the conditions of the stage it was dispatched in."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from envtune.agents.chat_tokens import ChatTokenizer
from envtune.agents.config import SamplingConfig
from envtune.environments import BfclEnvironment, EpisodeConfig, RewardKind
from envtune.runtime.engines.embedded import EmbeddedEngine
from envtune.runtime.engines.settings import EmbeddedEngineConfig
from envtune.runtime.recipe.config import CurriculumConfig, StageConfig
from envtune.runtime.recipe.curriculum import CurriculumScheduler
from envtune.runtime.recipe.episodes import CurriculumEpisodes
from envtune.runtime.weight_sync import AdapterPublisher


def test_a_stage_reply_budget_overrides_the_runs(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A stage's ``max_replies`` caps its episodes; 0 leaves the run's ``sampling.max_replies``."""
    episode = EpisodeConfig(max_steps_per_turn=8)  # no turn closes inside the budget
    one = StageConfig(
        name="one", reward=RewardKind.STAGE1, categories=("base",), max_replies=1, episode=episode
    )
    run_budget = dataclasses.replace(one, name="run", max_replies=0)
    sampling = SamplingConfig(max_new_tokens=8, max_replies=3)

    async def play(stage: StageConfig) -> tuple[int, int]:
        scheduler = CurriculumScheduler(CurriculumConfig(stages=(stage,), validation_every=0))
        task = scheduler.next_task()
        async with await EmbeddedEngine.open(tiny_model_dir, EmbeddedEngineConfig(device="cpu")) as engine:
            publisher = AdapterPublisher(tmp_path / stage.name, [engine])
            chat = ChatTokenizer(engine.tokenizer)
            runner = CurriculumEpisodes(engine, BfclEnvironment(), chat, publisher, sampling)
            trajectory = await runner(task, "g-0", 0)
        assert trajectory.transcript is not None
        return task.max_replies, len(trajectory.transcript.replies)

    assert asyncio.run(play(one)) == (1, 1)
    assert asyncio.run(play(run_budget)) == (0, 3)


def test_a_negative_stage_reply_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="max_replies must be >= 0"):
        StageConfig(name="bad", max_replies=-1)
