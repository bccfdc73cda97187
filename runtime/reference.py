"""The reference loop: what the rollout actor does, in lock-step synchronous batches.

``run_synchronous_batches`` runs groups batch by batch, each batch waiting for its slowest episode,
with the rollout actor's grouping and drop rules and no staleness (one policy version). It is the
document of what the actor must reproduce (tests compare them) and the synchronous baseline that
benchmarks measure the actor against.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from envtune.agents.engine import EngineError
from envtune.agents.trajectory import Trajectory
from envtune.runtime.records import DropReason, EpisodeRunner, TrajectoryGroup


@dataclass(frozen=True, slots=True)
class SynchronousResult:
    """What ``run_synchronous_batches`` produced."""

    groups: tuple[TrajectoryGroup, ...]
    """Emitted groups, in batch order."""
    dropped_by_reason: Mapping[DropReason, int]
    """Dropped episodes per reason (the actor's reasons)."""
    episodes_started: int
    """Episodes run."""


async def run_synchronous_batches(
    tasks: Iterable[Any],
    run_episode: EpisodeRunner,
    *,
    group_size: int,
    groups_per_batch: int,
    min_group_size: int = 2,
    policy_version: int = 0,
    group_prefix: str = "sync",
) -> SynchronousResult:
    """Groups in lock-step batches, each batch waiting for its slowest episode (see the module)."""
    specs = list(tasks)
    groups: list[TrajectoryGroup] = []
    dropped: Counter[DropReason] = Counter()
    started = 0
    for first in range(0, len(specs), groups_per_batch):
        chunk = specs[first : first + groups_per_batch]
        batch = [(f"{group_prefix}-{first + i:07d}", spec) for i, spec in enumerate(chunk)]
        async with asyncio.TaskGroup() as tg:
            runs = [
                [tg.create_task(_settle(run_episode(spec, gid, policy_version))) for _ in range(group_size)]
                for gid, spec in batch
            ]
        started += len(batch) * group_size
        for (gid, spec), members in zip(batch, runs, strict=True):
            done: list[Trajectory] = []
            for member in members:
                outcome = member.result()
                if isinstance(outcome, Trajectory):
                    done.append(outcome)
                else:
                    dropped[outcome] += 1
            if len(done) < min_group_size:
                if done:
                    dropped[DropReason.GROUP_INCOMPLETE] += len(done)
                continue
            groups.append(TrajectoryGroup(gid, spec, policy_version, tuple(done), group_size, policy_version))
    return SynchronousResult(tuple(groups), MappingProxyType(dict(dropped)), started)


async def _settle(episode: Awaitable[Trajectory]) -> Trajectory | DropReason:
    """The trajectory, or the drop reason the actor would record."""
    try:
        return await episode
    except EngineError:
        return DropReason.ENGINE_ERROR
    except Exception:
        return DropReason.EPISODE_ERROR
