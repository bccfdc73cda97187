"""Constrained episodes: the learner, replaying the masks the trajectory recorded, computes the
engine's behaviour logprobs.

Real BFCL episodes with the tiny model in the embedded engine through ``agents.run_episode`` (the
grammar of each turn's visible tools, a 16-character think block, augmented feedback, 2 steps per
turn). The trajectory itself records the constraint of every reply (``constraint_spans``); the
learner actor's ``BatchMasks`` turns those into ``token_masks``. No recording wrapper, no side list:
this is the path a training step takes.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from envtune.agents import (
    AgentConfig,
    ChatTokenizer,
    ConstraintCache,
    ConstraintSpan,
    Trajectory,
    run_episode,
)
from envtune.agents.config import SamplingConfig
from envtune.agents.grammar import GrammarOptions
from envtune.environments.episode import BfclEnvironment, EpisodeConfig
from envtune.optim.config import LearnerConfig, LoraSettings
from envtune.optim.learner import Learner
from envtune.runtime.engines.embedded import EmbeddedEngine
from envtune.runtime.engines.settings import EmbeddedEngineConfig
from envtune.runtime.recipe.learner_masks import BatchMasks, reply_constraints
from envtune.runtime.recipe.mask_replay import ReplayError
from transformers import AutoModelForCausalLM

TASKS = ("multi_turn_base_0", "multi_turn_base_1", "multi_turn_base_2")
TOLERANCE = 1e-4
"""Engine and learner logprobs must agree this closely (issue 10; measured about 1e-6)."""


async def constrained_episodes(model_dir: Path, temperature: float) -> list[Trajectory]:
    env = BfclEnvironment()
    cache = ConstraintCache(options=GrammarOptions(max_think_chars=16))
    sampling = SamplingConfig(
        temperature=temperature, max_new_tokens=96, max_episode_tokens=16384, max_replies=6
    )
    settings = EmbeddedEngineConfig(device="cpu", max_batch_rows=8)
    async with await EmbeddedEngine.open(model_dir, settings) as engine:
        chat = ChatTokenizer(engine.tokenizer)
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(
                    run_episode(
                        engine,
                        env.make_episode(task_id, EpisodeConfig(max_steps_per_turn=2)),
                        chat,
                        AgentConfig(sampling=sampling, constrained=True, seed=11 + k),
                        task_id=task_id,
                        group_id=f"g{k}",
                        constraints=cache,
                    )
                )
                for k, task_id in enumerate(TASKS)
            ]
    return [t.result() for t in tasks]


@pytest.fixture(scope="module", params=[1.0, 0.7], ids=["T1", "T0.7"])
def episodes(request: pytest.FixtureRequest, tiny_model_dir: Path) -> tuple[float, list[Trajectory]]:
    return request.param, asyncio.run(constrained_episodes(tiny_model_dir, request.param))


def behaviour(t: Trajectory) -> torch.Tensor:
    return torch.tensor([x for x, m in zip(t.behavior_logprobs, t.loss_mask, strict=True) if m])


def test_learner_logprobs_equal_the_engines_under_the_recorded_masks(
    episodes: tuple[float, list[Trajectory]], tiny_model_dir: Path, tokenizer: Any
) -> None:
    temperature, trajectories = episodes
    assert all(t.constrained for t in trajectories)
    assert all(c is not None for t in trajectories for c in reply_constraints(t))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    learner = Learner(model, LearnerConfig(lora=LoraSettings(rank=4, alpha=8.0)), temperature=temperature)
    masks = BatchMasks.for_model(model, tokenizer).source(trajectories)
    masked = learner.logprobs(trajectories, token_masks=masks)
    unmasked = learner.logprobs(trajectories)
    expected = [behaviour(t) for t in trajectories]
    masked_diff = max(float((a - b).abs().max()) for a, b in zip(masked, expected, strict=True))
    unmasked_diff = max(float((a - b).abs().max()) for a, b in zip(unmasked, expected, strict=True))
    tokens = sum(len(b) for b in expected)
    assert tokens > 100, tokens
    assert masked_diff < TOLERANCE, (masked_diff, unmasked_diff, tokens)
    assert unmasked_diff > 0.5, unmasked_diff  # without the replay the learner is far off


def test_an_unconstrained_batch_needs_no_masks(
    episodes: tuple[float, list[Trajectory]], tiny_model_dir: Path, tokenizer: Any
) -> None:
    _, trajectories = episodes
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = [replace(t, constraint_spans=()) for t in trajectories]
    assert BatchMasks.for_model(model, tokenizer).source(plain) is None


def test_spans_that_do_not_match_the_replies_are_refused(episodes: tuple[float, list[Trajectory]]) -> None:
    _, trajectories = episodes
    t = trajectories[0]
    first = t.constraint_spans[0]
    short = replace(t, constraint_spans=(ConstraintSpan(first.start, first.end - 1, first.constraint),))
    with pytest.raises(ReplayError, match="does not cover the reply"):
        reply_constraints(short)
    inside = replace(t, constraint_spans=(ConstraintSpan(first.start + 1, first.end, first.constraint),))
    with pytest.raises(ReplayError, match="start no reply"):
        reply_constraints(inside)
    # Only the first reply recorded: the others count as unconstrained (rows of -1).
    partial = replace(t, constraint_spans=(first,))
    assert [c is not None for c in reply_constraints(partial)][:2] == [True, False]
