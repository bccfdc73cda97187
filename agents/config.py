"""How an agent runs one episode: sampling, constrained decoding, length caps, the reward.

One frozen record per curriculum stage; the runtime builds it from its own config and hands it to
``run_episode`` unchanged for every episode of a group.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from envtune.runtime.engines.base import SamplingParams


class RewardKind(enum.StrEnum):
    """Which episode score becomes ``Trajectory.reward``."""

    PROGRESS = "progress"
    """R_P: passed turns over all turns of the task (stages 2-4)."""
    STAGE1 = "stage1"
    """I_tool * (R_format + R_tool), the syntax reward of stage 1 (paper.md §3.1)."""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Per-stage settings of the episode loop."""

    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=1024))
    """Sampling of each reply. ``max_new_tokens`` caps one reply (it is lowered further near
    ``max_total_tokens``); the chat template's end-of-turn token is always added to the stop tokens;
    ``n`` must be 1 (one episode samples one continuation at a time)."""
    constrained: bool = False
    """Constrain every reply to the paper's formats and the visible tools' schemas (a grammar)."""
    max_total_tokens: int = 32768
    """Cap on the whole trajectory (prompt, replies, feedback): the learner's context length. An
    episode that reaches it stops, marked truncated; its unreached turns score 0."""
    max_replies: int = 100
    """Cap on model replies per episode (official code: ``multi_turn.max_turns: 100``); the
    environment's per-turn step limit normally ends episodes long before."""
    reward: RewardKind = RewardKind.PROGRESS
    """Which score is the trajectory's reward."""
    adapter: str | None = None
    """LoRA adapter name passed to the engine (None: the engine's current policy)."""

    def __post_init__(self) -> None:
        if self.sampling.n != 1:
            raise ValueError(f"sampling.n must be 1 for an episode, got {self.sampling.n}")
        if self.max_total_tokens < 2:
            raise ValueError(f"max_total_tokens must be >= 2, got {self.max_total_tokens}")
        if self.max_replies < 1:
            raise ValueError(f"max_replies must be >= 1, got {self.max_replies}")
