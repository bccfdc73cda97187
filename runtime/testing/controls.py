"""Control arms for learning tests and benchmarks: the same run with the learning signal removed.

``ShuffledRewards`` wraps a learner and permutes each batch's rewards across its trajectories before
the step: the same reward mean and spread, the same tokens, masks and cost, but no relation between a
sample and its reward. What such an arm gains comes from sampling noise, the KL and entropy terms and
random updates; a learning arm must beat it. The scheduler and the metrics still see the true rewards
(the shuffle happens inside the learner's step), so both arms' reward curves mean the same thing.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from envtune.agents.trajectory import Trajectory


class ShuffledRewards:
    """A learner whose every batch has its rewards shuffled (everything else delegated)."""

    def __init__(self, inner: Any, seed: int = 0) -> None:
        self.inner = inner
        self._rng = random.Random(seed)

    def step(self, trajectories: Sequence[Trajectory], *, token_masks: Any = None) -> Any:
        rewards = [t.reward for t in trajectories]
        self._rng.shuffle(rewards)
        shuffled = [replace(t, reward=r) for t, r in zip(trajectories, rewards, strict=True)]
        return self.inner.step(shuffled, token_masks=token_masks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
