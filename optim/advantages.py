"""GRPO advantages: each episode's reward normalised within its group (paper eq. 5).

A = (R - mean_G) / (std_G + eps), with no critic. A group whose rewards are all equal carries no
policy-gradient signal; whether its episodes stay in the batch (advantage 0, still counted by the KL
and entropy terms and by the token normaliser) or are dropped is a config choice, and the counts are
returned so the learner can log them. Deliberately left out: reward shaping, per-turn credit.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass


class ZeroVariancePolicy(enum.StrEnum):
    """What to do with a group whose rewards are all equal."""

    KEEP = "keep"
    """Keep its episodes with advantage 0 (verl's and the paper's behaviour)."""
    DROP = "drop"
    """Drop its episodes from the batch (DAPO-style dynamic filtering, without the resampling)."""


@dataclass(frozen=True, slots=True)
class AdvantageConfig:
    """How rewards become advantages."""

    normalize_std: bool = True
    """Divide by the group's standard deviation (GRPO); False gives Dr.GRPO's mean-centring only."""
    eps: float = 1e-6
    """Added to the standard deviation before dividing."""
    zero_variance: ZeroVariancePolicy = ZeroVariancePolicy.KEEP
    """Policy for groups whose rewards are all equal (and for singleton groups)."""
    zero_variance_tol: float = 1e-8
    """Rewards whose range is at most this count as equal."""


@dataclass(frozen=True, slots=True)
class GroupAdvantages:
    """Advantages for a batch of episodes, aligned with the input order."""

    advantages: tuple[float, ...]
    """One advantage per episode (0.0 for episodes of zero-variance groups)."""
    keep: tuple[bool, ...]
    """False for episodes dropped under ``ZeroVariancePolicy.DROP``."""
    num_groups: int
    """Distinct group ids in the batch."""
    num_zero_variance_groups: int
    """Groups whose rewards were all equal."""
    num_dropped: int
    """Episodes dropped (0 under ``KEEP``)."""


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
    keep = [True] * len(rewards)
    zero_variance = 0
    for idx in members.values():
        values = [rewards[i] for i in idx]
        if len(values) < 2 or max(values) - min(values) <= config.zero_variance_tol:
            zero_variance += 1
            if config.zero_variance is ZeroVariancePolicy.DROP:
                for i in idx:
                    keep[i] = False
            continue
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        scale = std + config.eps if config.normalize_std else 1.0
        for i in idx:
            advantages[i] = (rewards[i] - mean) / scale
    return GroupAdvantages(
        advantages=tuple(advantages),
        keep=tuple(keep),
        num_groups=len(members),
        num_zero_variance_groups=zero_variance,
        num_dropped=keep.count(False),
    )
