"""GRPO advantages: each episode's reward normalised within its group (docs/method.md §7.1).

A = (R - mean_G) / (std_G + eps), with no critic. A group whose rewards are all equal carries no
policy-gradient signal: its episodes get advantage 0 (still counted by the KL and entropy terms and
by the token normaliser). Whether such a group reaches the learner at all is the curriculum's choice
per stage, made with the same test, ``is_zero_variance``. Standard library only.
Deliberately left out: reward shaping, per-turn credit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .config import AdvantageConfig

ZERO_VARIANCE_TOL = 1e-8
"""Rewards whose range is at most this count as equal."""


def is_zero_variance(rewards: Sequence[float]) -> bool:
    """True when a group's rewards carry no policy-gradient signal (fewer than two, or all equal)."""
    return len(rewards) < 2 or max(rewards) - min(rewards) <= ZERO_VARIANCE_TOL


@dataclass(frozen=True, slots=True)
class GroupAdvantages:
    """Advantages for a batch of episodes, aligned with the input order."""

    advantages: tuple[float, ...]
    """One advantage per episode (0.0 for episodes of zero-variance groups)."""
    num_groups: int
    """Distinct group ids in the batch."""
    num_zero_variance_groups: int
    """Groups whose rewards were all equal."""


def group_advantages(
    rewards: Sequence[float], group_ids: Sequence[str], config: AdvantageConfig = AdvantageConfig()
) -> GroupAdvantages:
    """Normalise ``rewards`` within the groups named by ``group_ids``.

    The standard deviation is the unbiased one (``torch.std``'s default, which verl's GRPO uses).
    """
    if len(rewards) != len(group_ids):
        raise ValueError(f"{len(rewards)} rewards but {len(group_ids)} group ids")
    for r in rewards:
        if not math.isfinite(r):
            raise ValueError(f"reward must be finite, got {r}")
    members: dict[str, list[int]] = {}
    for i, g in enumerate(group_ids):
        members.setdefault(g, []).append(i)

    advantages = [0.0] * len(rewards)
    zero_variance = 0
    for idx in members.values():
        values = [rewards[i] for i in idx]
        if is_zero_variance(values):
            zero_variance += 1
            continue
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        scale = std + config.eps if config.normalize_std else 1.0
        for i in idx:
            advantages[i] = (rewards[i] - mean) / scale
    return GroupAdvantages(
        advantages=tuple(advantages),
        num_groups=len(members),
        num_zero_variance_groups=zero_variance,
    )
