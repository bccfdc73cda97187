"""How an agent samples and runs one episode.

``SamplingConfig`` is the run config's ``sampling`` section (one declaration of every sampling knob);
``AgentConfig`` adds what a curriculum stage decides per episode. ``run_episode`` takes both unchanged
for every episode of a group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from envtune.agents.engine import SamplingParams
from envtune.environments.types import RewardKind


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """Sampling of every model reply, and the length caps of an episode."""

    temperature: float = 1.0
    """Sampling temperature (verl's default 1.0; the release sets none). 0 is greedy, which only
    evaluation may use: a greedy sample has no behaviour logprobs a learner can recompute."""
    top_p: float = 1.0
    """Nucleus mass (1 = off)."""
    top_k: int = -1
    """Top-k cut-off (-1 = off)."""
    max_new_tokens: int = 2048
    """Cap on one model reply (one step); lowered near ``max_episode_tokens``."""
    max_episode_tokens: int = 32768
    """Cap on prompt + everything appended in an episode (the release's ``max_model_len``): an
    episode that reaches it stops, marked truncated, and its unreached turns score 0."""
    max_replies: int = 100
    """Cap on model replies per episode (the release's ``multi_turn.max_turns``); the environment's
    per-turn step limit normally ends episodes long before."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra stop tokens; the chat template's end-of-turn token is always one."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_episode_tokens < 2:
            raise ValueError(f"max_episode_tokens must be >= 2, got {self.max_episode_tokens}")
        if self.max_replies < 1:
            raise ValueError(f"max_replies must be >= 1, got {self.max_replies}")

    def request_params(
        self, max_new_tokens: int, stop_token_ids: tuple[int, ...], seed: int | None = None
    ) -> SamplingParams:
        """The engine request's sampling parameters for one reply (always one continuation)."""
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop_token_ids=stop_token_ids,
            seed=seed,
        )


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """What one episode runs under: the sampling section plus the stage's choices."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampling and length caps."""
    constrained: bool = False
    """Constrain every reply to the paper's formats and the visible tools' schemas (a grammar)."""
    reward: RewardKind = RewardKind.PROGRESS
    """Which score is the trajectory's reward."""
    adapter: str | None = None
    """LoRA adapter name passed to the engine (None: the engine's base weights)."""
    seed: int | None = None
    """Sampling seed of this episode's requests, for reproducible tests (None: the engine's own)."""
