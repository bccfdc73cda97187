"""τ²'s aggregate metrics over repeated trials: average reward and pass^k.

pass^k (Yao et al. 2024, as tau2 computes it): for a task run n times with c successes, the chance
that k trials drawn without replacement all succeed, C(c, k) / C(n, k); averaged over tasks, for every
k up to the smallest number of trials any task has. A trial succeeds when its reward is within 1e-6 of 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from envtune.environments.tau2.judge import SUCCESS_TOLERANCE


def is_success(reward: float) -> bool:
    return abs(reward - 1.0) <= SUCCESS_TOLERANCE


def pass_hat_k(num_trials: int, success_count: int, k: int) -> float:
    """C(c, k) / C(n, k)."""
    if not 0 <= success_count <= num_trials:
        raise ValueError(f"success_count {success_count} outside [0, {num_trials}]")
    if num_trials < k:
        raise ValueError(f"Number of trials {num_trials} is less than k {k}.")
    return math.comb(success_count, k) / math.comb(num_trials, k)


@dataclass(frozen=True, slots=True)
class Tau2Metrics:
    """Aggregates of a τ² evaluation."""

    average_reward: float
    pass_hat: Mapping[int, float]
    """k -> pass^k, for k = 1 .. the fewest trials of any task."""
    tasks: int
    trials: int


def compute_metrics(rewards: Iterable[tuple[str, float]]) -> Tau2Metrics:
    """From (task id, reward) pairs, one per trial."""
    by_task: dict[str, list[float]] = {}
    for task_id, reward in rewards:
        by_task.setdefault(task_id, []).append(reward)
    if not by_task:
        return Tau2Metrics(average_reward=0.0, pass_hat={}, tasks=0, trials=0)
    all_rewards = [r for rs in by_task.values() for r in rs]
    max_k = min(len(rs) for rs in by_task.values())
    pass_hat = {
        k: sum(pass_hat_k(len(rs), sum(map(is_success, rs)), k) for rs in by_task.values()) / len(by_task)
        for k in range(1, max_k + 1)
    }
    return Tau2Metrics(
        average_reward=sum(all_rewards) / len(all_rewards),
        pass_hat=pass_hat,
        tasks=len(by_task),
        trials=len(all_rewards),
    )
