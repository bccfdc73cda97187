"""What every evaluation suite offers a runner: task records, episodes, verdicts.

BFCL V3 (``episode.BfclEnvironment``) came first; the out-of-distribution suites (BFCL V4 memory and
web search, τ²-bench, ACEBench) expose the same episode calls — ``start() -> messages``,
``step(reply) -> StepResult``, ``visible_tools()``, ``score() -> EpisodeScore``, ``close()`` — plus
what a generic runner needs beyond V3: the task list with categories and dependencies, and a
per-task ``TaskVerdict`` whose ``detail`` explains the verdict in the benchmark's own terms.

Plain records and protocols only; no suite is imported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from envtune.environments.types import EpisodeScore, FunctionDoc, Message, StepResult


class DependencyError(RuntimeError):
    """An episode was requested before the tasks it depends on ran to completion."""


@dataclass(frozen=True, slots=True)
class SuiteTask:
    """One task of a suite, as a runner schedules it."""

    id: str
    """The benchmark's task id."""
    category: str
    """Sub-category for per-category accuracy (e.g. ``memory_kv``, ``retail``, ``agent_multi_turn``)."""
    scored: bool = True
    """False for set-up tasks that carry no verdict (BFCL V4 memory prerequisite conversations)."""
    depends_on: tuple[str, ...] = ()
    """Ids that must have run to completion (episode done or closed) before this one starts."""


@dataclass(frozen=True, slots=True)
class TaskVerdict:
    """The verdict on one finished episode, in the suite's own metric."""

    task_id: str
    suite: str
    category: str
    passed: bool
    """The benchmark's pass/fail (BFCL: answer found; τ²: reward 1; ACEBench: end state and path)."""
    reward: float
    """The benchmark's scalar reward (1.0/0.0 for binary suites; τ²'s product of its components)."""
    detail: Mapping[str, Any] = field(default_factory=dict)
    """JSON-ready explanation (failure reason, matched answer, reward breakdown, judge notes)."""


class SuiteEpisode(Protocol):
    """One episode of any suite (the calls BFCL V3's ``Episode`` already has, plus ``verdict``)."""

    @property
    def done(self) -> bool: ...

    def start(self) -> tuple[Message, ...]: ...

    def step(self, reply: str | bytes) -> StepResult: ...

    def visible_tools(self) -> tuple[FunctionDoc, ...]: ...

    def score(self) -> EpisodeScore: ...

    def verdict(self) -> TaskVerdict | None:
        """The verdict once ``done`` (None for unscored tasks or before the end)."""
        ...

    def close(self) -> None: ...


class SuiteEnvironment(Protocol):
    """Builds the episodes of one suite."""

    @property
    def suite(self) -> str: ...

    def tasks(self) -> Sequence[SuiteTask]: ...

    def make_episode(self, task_id: str, config: Any = None) -> SuiteEpisode: ...

    def close(self) -> None: ...
