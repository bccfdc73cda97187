"""Records and protocols at the runtime's boundaries: what the rollout is given and what it hands on.

The rollout actor takes task specs from a ``TaskSource``, runs each through an ``EpisodeRunner`` and
emits ``TrajectoryGroup``s to a ``GroupSink``; the learner side answers with ``PolicyUpdated`` and
``GroupsDiscarded``. Every episode or group that ends without being trained ends with one
``DropReason``, shared by the rollout and the learner so that ``dropped/<reason>`` metrics have one
vocabulary. Everything here is plain data: no actor, no engine.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from envtune.agents.trajectory import Trajectory


class DropReason(enum.StrEnum):
    """Why an episode or a group ended without being trained."""

    ENGINE_ERROR = "engine_error"
    """The engine failed the episode's request for good (after its own retries)."""
    EPISODE_ERROR = "episode_error"
    """The episode runner raised something else (a bug or an environment failure)."""
    TIMEOUT = "timeout"
    """The episode ran past ``RolloutConfig.episode_timeout_s``."""
    CANCELLED = "cancelled"
    """The run stopped while the episode or group was in flight."""
    INVALID_TRAJECTORY = "invalid_trajectory"
    """The runner returned something that is not a trajectory of this group."""
    GROUP_INCOMPLETE = "group_incomplete"
    """Fewer than ``min_group_size`` members of the group completed."""
    STALE = "stale"
    """The group could no longer be trained within the staleness bound."""
    EMIT_FAILED = "emit_failed"
    """The trajectory sink refused the group (it was closed)."""
    EMPTY = "empty"
    """A group with no trajectories reached the learner."""
    ZERO_VARIANCE = "zero_variance"
    """All rewards of the group were equal (no advantage), and its stage drops such groups."""
    NOT_TRAINED = "not_trained"
    """The learner step that took the group made no update (non-finite gradient, no model tokens)."""
    RUN_ENDING = "run_ending"
    """The group reached the learner after the run had decided to end."""


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A minimal task spec (tests, benchmarks); a curriculum hands out its own richer one."""

    task_id: str
    """The environment's task id."""
    stage: int = 0
    """Curriculum stage the group is run in (1-4; 0 outside a curriculum)."""


class TaskLike(Protocol):
    """What the rollout needs of a task spec: its id."""

    @property
    def task_id(self) -> str: ...


class TaskSource(Protocol):
    """Where tasks come from; ``None`` means no more work. An exception from it is a bug and ends
    the rollout actor."""

    async def next_task(self) -> TaskLike | None: ...


class IteratorTaskSource:
    """A ``TaskSource`` over a finite or endless iterable of task specs."""

    def __init__(self, tasks: Iterable[TaskLike]) -> None:
        self._tasks = iter(tasks)

    async def next_task(self) -> TaskLike | None:
        return next(self._tasks, None)


EpisodeRunner = Callable[[Any, str, int], Awaitable[Trajectory]]
"""``run(task, group_id, start_version) -> Trajectory``: one whole episode; may raise."""


@dataclass(frozen=True, slots=True)
class TrajectoryGroup:
    """The finished members of one GRPO group: what the learner consumes."""

    group_id: str
    """Unique id; equals ``group_id`` of every trajectory in it."""
    task: Any
    """The task spec every member ran (what the task source handed out)."""
    start_version: int
    """Policy version current when the group was dispatched."""
    trajectories: tuple[Trajectory, ...]
    """Completed members (``min_group_size`` <= len <= ``group_size``)."""
    size: int
    """Members started (the rest of ``trajectories`` up to it were dropped)."""
    emitted_version: int
    """Policy version current when the group was emitted."""


class GroupPins(Protocol):
    """Pins the policy a group samples under from dispatch until the group ends, so every member of
    one GRPO group samples under the same weights (and those stay loaded until it ends)."""

    def pin(self, group_id: str) -> int | None:
        """Pin the current policy to a new group; its version (None: nothing to pin, the base)."""
        ...

    async def unpin(self, group_id: str) -> None:
        """The group ended (emitted or dropped): let its policy go."""
        ...


class GroupSink(Protocol):
    """Receives finished groups (an actor or a ``Mailbox``); ``send`` waits when full."""

    async def send(self, message: TrajectoryGroup) -> None: ...


@dataclass(frozen=True, slots=True)
class PolicyUpdated:
    """The engines now serve this policy version (sent by the learner after a publish)."""

    version: int
    """New policy version (never lower than the previous one)."""


@dataclass(frozen=True, slots=True)
class GroupsDiscarded:
    """Groups the learner received but did not train on; they give their admission slots back."""

    count: int
    """How many groups."""
    reason: DropReason
    """Why."""


def is_stale(start_version: int, version: int, max_staleness: int | None) -> bool:
    """The one staleness rule: a group dispatched under ``start_version`` may be trained at
    ``version`` only if ``version - start_version <= max_staleness`` (None: unbounded)."""
    return max_staleness is not None and version - start_version > max_staleness
