"""The whole stack learns: engine, episode loop, learner and adapter publishing raise a reward.

A tiny random model in the embedded engine plays the toy environment (``environments/toy.py``: call
the tool the user names) under a narrow grammar (empty think block, one tool call, no free
whitespace, keys in order), sampled at temperature 1 with the engine's behaviour logprobs. Each
step runs ``GROUPS`` GRPO groups of ``GROUP_SIZE`` episodes through ``agents.run_episode`` with the
adapter that is current, trains one ``Learner.step`` (LoRA) on the trajectories, and publishes the
new adapter to the engine through ``AdapterPublisher``. The reward curve is each step's batch mean.

Every prompt names the same tool (``cd``, phrased three ways). A random model calls it about a
quarter of the time and ends about half its replies with ``<|endoftext|>`` instead of
``<|im_end|>`` (a format error, see Known 1), so the start is ~0.1; learning a name preference and
the right end token takes the reward past 0.5 within ten steps (measured, seeds 0-3: start
0.06-0.16, end 0.56-0.62; control end 0.05-0.13). Prompt-conditional learning (a different tool per
prompt) is out of this model's reach in any CI budget: over 100 steps the reward went from 0.12 to
0.20 (means of the first and last ten), all of it from the end token; the named tool's share stayed
near a quarter.

The control arm runs the same loop, same seeds, with the batch's rewards shuffled across its
trajectories (same reward mean and variance, no relation to the samples). Its rise bounds what
sampling noise, the entropy bonus and random updates do alone; the trained arm must beat it and its
own start by ``MARGIN``. For scale: one step's batch mean of 32 Bernoulli rewards with p <= 0.5 has
a standard deviation <= 0.09, the mean of the last ``TAIL`` steps <= 0.04; ``MARGIN`` is 6 of those.

Known (measured here, reported to the lead):

1. The engine stops on any EOS id of the model (``<|im_end|>`` and ``<|endoftext|>``, as Qwen2.5's
   generation config has), and the grammar lets either end the reply; ``ChatTokenizer.decode_reply``
   strips only ``<|im_end|>``, so a reply ending in ``<|endoftext|>`` reaches the parser with it
   and is a format error.
2. The engine's logprobs are grammar-masked while the learner's are not, so the behaviour weight
   proximal/behaviour is the unmasked mass of the allowed tokens (~1e-3 for this model) and shrinks
   the policy-gradient term by that much. Adam's scale invariance still lets the PG term train, but
   any unscaled term drowns it: with the default ``kl_coef=0.1`` this loop does not learn (0.09 ->
   0.11 over 15 steps), hence ``kl_coef=0`` here.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from envtune.agents import AgentConfig, ChatTokenizer, ConstraintCache, Trajectory, run_episode
from envtune.agents.config import SamplingConfig
from envtune.agents.grammar import GrammarOptions
from envtune.environments.types import StepCode
from envtune.optim.config import LearnerConfig, LoraSettings, LossConfig
from envtune.optim.learner import Learner
from envtune.runtime.engines.embedded import EmbeddedEngine
from envtune.runtime.engines.settings import EmbeddedEngineConfig
from envtune.runtime.testing.toy_env import TOY_TOOLS, EpisodeStateError, NamedToolEpisode, toy_function_docs
from envtune.runtime.weight_sync import AdapterPublisher
from transformers import AutoModelForCausalLM

STEPS = 12
"""Learner steps per arm (the curve has one point per step, sampled before that step's update)."""
GROUPS = 4
"""GRPO groups (prompts) per step."""
GROUP_SIZE = 8
"""Episodes per group."""
PROMPT_SEEDS = (0, 4, 8, 12)
"""Toy seeds of the groups: all name ``cd`` (seed % 4 == 0), in the three phrasings."""
TAIL = 5
"""The end reward is the mean of the last ``TAIL`` steps."""
MARGIN = 0.25
"""How far the trained arm must end above its start and above the control arm's end."""
GRAMMAR = GrammarOptions(
    max_think_chars=0, allow_answer=False, max_calls=1, any_whitespace=False, any_order=False
)
"""Only the reply shape the toy rewards, so the random model's tokens go to the decision."""
SAMPLING = SamplingConfig(max_new_tokens=64, max_episode_tokens=256)
"""Replies take 30-45 tokens (the random model spells tags and keys in short tokens)."""
LEARNER = LearnerConfig(lr=1e-2, lora=LoraSettings(rank=4, alpha=8.0), loss=LossConfig(kl_coef=0.0))
"""A large lr for a tiny random model; no KL (see the module docstring)."""


# --- the probe's environment scores what it says ---------------------------------------------------


def call(name: str, arguments: str = "{}") -> str:
    return f'<think></think><tool_call>[{{"name": "{name}", "arguments": {arguments}}}]</tool_call>'


def test_toy_seed_picks_the_named_tool_and_phrasing() -> None:
    first, again, other = NamedToolEpisode(5), NamedToolEpisode(5), NamedToolEpisode(6)
    assert first.start() == again.start() != other.start()
    system, user = first.start()
    assert (system.role, user.role) == ("system", "user")
    assert first.target == TOY_TOOLS[5 % len(TOY_TOOLS)] and first.target in user.content
    assert all(name in system.content for name in TOY_TOOLS)
    assert [d.name for d in first.visible_tools()] == list(TOY_TOOLS)
    assert {NamedToolEpisode(s).target for s in PROMPT_SEEDS} == {"cd"}


@pytest.mark.parametrize(
    ("reply", "code", "progress", "stage1"),
    [
        (call("cd"), StepCode.TURN_PASS, 1.0, 2.0),
        (call("ls"), StepCode.TURN_FAIL, 0.0, 1.0),
        (call("cd", '{"x": 1}'), StepCode.TURN_FAIL, 0.0, 1.0),
        (call("cd").replace("}]", '}, {"name": "cd", "arguments": {}}]'), StepCode.TURN_FAIL, 0.0, 1.0),
        ("<think></think><answer>cd</answer>", StepCode.TURN_FAIL, 0.0, 0.0),
        (call("cd") + "<|endoftext|>", StepCode.FORMAT_ERROR, 0.0, 0.0),
        ("cd", StepCode.FORMAT_ERROR, 0.0, 0.0),
    ],
)
def test_toy_reward_is_one_call_of_the_named_tool(
    reply: str, code: StepCode, progress: float, stage1: float
) -> None:
    episode = NamedToolEpisode(0)
    episode.start()
    result = episode.step(reply)
    assert (result.code, result.done, result.observation) == (code, True, ())
    assert (result.error is not None) == (code is StepCode.FORMAT_ERROR)
    score = episode.score()
    assert (score.progress, score.tool_reward, score.stage1_reward) == (progress, progress, stage1)
    assert score.turn_passed == (progress == 1.0,) and score.step_codes == (int(code),)
    with pytest.raises(EpisodeStateError):
        episode.step(call("cd"))


def test_toy_refuses_misuse() -> None:
    with pytest.raises(EpisodeStateError):
        NamedToolEpisode(0).step(call("cd"))
    with pytest.raises(ValueError, match="distinct"):
        toy_function_docs(("cd", "cd"))
    assert NamedToolEpisode(0).score().turns_reached == 0


# --- the learning test ----------------------------------------------------------------------------


async def run_arm(
    tiny_model_dir: Path, root: Path, *, shuffle: bool, seed: int = 0
) -> tuple[list[float], list[int]]:
    """One arm: per step, the batch mean reward and the policy version the samples came from."""
    torch.manual_seed(seed)  # the LoRA A matrices: the same start in both arms
    learner = Learner(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), LEARNER)
    shuffler = random.Random(seed)
    constraints = ConstraintCache(options=GRAMMAR)
    curve: list[float] = []
    versions: list[int] = []
    async with await EmbeddedEngine.open(
        tiny_model_dir, EmbeddedEngineConfig(device="cpu", max_batch_rows=GROUPS * GROUP_SIZE)
    ) as engine:
        chat = ChatTokenizer(engine.tokenizer)
        publisher = AdapterPublisher(root, [engine])
        for step in range(STEPS):
            async with publisher.use() as adapter, asyncio.TaskGroup() as tg:
                tasks = []
                for g, prompt_seed in enumerate(PROMPT_SEEDS):
                    for i in range(GROUP_SIZE):
                        config = AgentConfig(
                            sampling=SAMPLING,
                            constrained=True,
                            adapter=adapter.name if adapter is not None else None,
                            seed=seed * 10**6 + step * 1000 + g * GROUP_SIZE + i,
                        )
                        episode = run_episode(
                            engine, NamedToolEpisode(prompt_seed), chat, config, task_id=f"toy-{prompt_seed}",
                            group_id=f"{step}-{g}", start_version=learner.policy_version,
                            constraints=constraints,
                        )
                        tasks.append(tg.create_task(episode))
            batch: list[Trajectory] = [t.result() for t in tasks]
            curve.append(statistics.fmean(t.reward for t in batch))
            sampled = {v for t in batch for v, m in zip(t.policy_versions, t.loss_mask, strict=True) if m}
            assert len(sampled) == 1, sampled
            versions.append(sampled.pop())
            if shuffle:
                rewards = [t.reward for t in batch]
                shuffler.shuffle(rewards)
                batch = [replace(t, reward=r) for t, r in zip(batch, rewards, strict=True)]
            metrics = await asyncio.to_thread(learner.step, batch)
            assert metrics.staleness_max == 0
            await publisher.publish(learner)
        await publisher.unload_all()
    return curve, versions


async def both_arms(tiny_model_dir: Path, root: Path) -> tuple[tuple[list[float], list[int]], list[float]]:
    """The two arms side by side: one's generation overlaps the other's learner step (2 cores)."""
    async with asyncio.TaskGroup() as tg:
        trained = tg.create_task(run_arm(tiny_model_dir, root / "trained", shuffle=False))
        control = tg.create_task(run_arm(tiny_model_dir, root / "control", shuffle=True))
    return trained.result(), control.result()[0]


@pytest.mark.filterwarnings("ignore:Adapter policy-v:UserWarning")  # peft, when a version is retired
def test_reward_rises_beyond_a_shuffled_reward_control(tiny_model_dir: Path, tmp_path: Path) -> None:
    began = time.monotonic()
    (trained, versions), control = asyncio.run(both_arms(tiny_model_dir, tmp_path))
    seconds = time.monotonic() - began
    # Every step sampled with the adapter published after the previous step (step 0: the base).
    assert versions == list(range(STEPS))
    start, end = trained[0], statistics.fmean(trained[-TAIL:])
    control_end = statistics.fmean(control[-TAIL:])
    report = f"trained {trained} control {control} ({seconds:.0f}s)"
    assert control_end - control[0] < MARGIN, report
    assert end - start > MARGIN, report
    assert end - control_end > MARGIN, report
