"""Running an evaluation suite: which episodes (selection, dependencies, trials), each one through the
agent's episode loop, and one verdict per episode.

Every suite of ``environments/suites.py`` (BFCL V3 through ``BfclV3Suite``) offers the same calls:
``tasks()`` (ids, categories, whether scored, dependencies), ``make_episode(id, config)`` and the
episode API. ``plan_runs`` turns the task list and the ``tasks`` section of the eval config into runs:
the scored tasks chosen by ``ids`` or ``limit``, each ``trials`` times, plus every task they depend on
(BFCL V4 memory's prerequisite conversations), once and unscored. ``run_suite`` plays them with
``agents.run_episode`` at up to ``concurrency`` at once; a run starts only when the runs of all the
tasks it depends on have ended (however they ended), so a memory scenario's conversations go in
order while scenarios, and questions, run in parallel.

A suite whose steps block (τ²'s user simulator over HTTP, tools in a child process;
``SuiteInfo.blocking_steps``) has its episode calls run on a thread pool of ``concurrency`` threads,
and the loop awaits each step; the event loop, and so the engine's other episodes, keep running.

Error boundary: anything one run raises (an engine error, a tool worker that died, a dependency that
never completed) makes that run a failed task whose verdict says why; the suite goes on. The episode
is always closed (which also hands a prerequisite conversation's memory on, and judges a τ²
conversation cut short).

Left out: the engines, and what is written (``eval_output.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from envtune.agents.chat_tokens import ChatTokenizer
from envtune.agents.config import AgentConfig
from envtune.agents.engine import Engine
from envtune.agents.episode_loop import run_episode
from envtune.agents.grammar import ConstraintCache
from envtune.agents.trajectory import Reply, Trajectory, Transcript
from envtune.environments.episode import BfclEnvironment, EpisodeConfig
from envtune.environments.suite_api import SuiteTask, TaskVerdict
from envtune.environments.types import EpisodeScore, FunctionDoc, Message, StepResult
from envtune.runtime.recipe.config import ConfigError
from envtune.runtime.recipe.evaluation import select_tasks

log = structlog.get_logger(__name__)

T = TypeVar("T")


# --- BFCL V3 behind the suite calls -------------------------------------------------------------------


class BfclV3Suite:
    """BFCL V3 multi-turn as a suite: the committed split's part and categories; a task passes when
    every turn passes (BFCL's multi-turn verdict)."""

    suite = "bfcl-v3"

    def __init__(self, environment: BfclEnvironment, split: str, categories: Sequence[str]) -> None:
        self.environment = environment
        self.split = split
        self._ids = select_tasks(split, categories, 0)

    def tasks(self) -> tuple[SuiteTask, ...]:
        return tuple(SuiteTask(id=i, category=self.environment.tasks[i].category) for i in self._ids)

    def make_episode(self, task_id: str, config: EpisodeConfig | None = None) -> Any:
        return self.environment.make_episode(task_id, config)

    def close(self) -> None:
        """Nothing to release (BFCL V3 episodes hold their own instances)."""


# --- which runs ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlannedRun:
    """One episode to play."""

    task_id: str
    category: str
    scored: bool
    """False for a task run only because a chosen one depends on it (no verdict is counted)."""
    depends_on: tuple[str, ...]
    """Task ids whose runs must all have ended before this one starts."""
    trial: int = 0
    """0 .. trials-1 for a scored task."""


def ids_for_suite(suite: str, ids: Sequence[str], known_suites: Sequence[str]) -> set[str] | None:
    """The ids of ``ids`` meant for ``suite``: plain ``ID`` (every suite) or ``SUITE:ID``; None when no
    id addresses the suite (its own selection, ``limit``, applies)."""
    chosen = set()
    for item in ids:
        prefix, sep, rest = item.partition(":")
        if sep and prefix in known_suites:
            if prefix == suite:
                chosen.add(rest)
        else:
            chosen.add(item)
    return chosen or None


def plan_runs(
    tasks: Sequence[SuiteTask], *, ids: set[str] | None = None, limit: int = 0, trials: int = 1
) -> list[PlannedRun]:
    """The runs of one suite, in the suite's task order (see the module docstring).

    ``ids`` (None: no restriction) picks tasks by id; without them, ``limit`` keeps at most that many
    scored tasks per category (0: all). Raises ``ConfigError`` for a dependency on an unknown task or a cycle.
    """
    by_id = {task.id: task for task in tasks}
    chosen: list[SuiteTask] = []
    per_category: dict[str, int] = {}
    for task in tasks:
        if ids is not None and task.id not in ids:
            continue
        if ids is None and not task.scored:
            continue  # set-up tasks come in only as dependencies
        if task.scored and limit and ids is None:  # ids named one by one are all run
            if per_category.get(task.category, 0) >= limit:
                continue
            per_category[task.category] = per_category.get(task.category, 0) + 1
        chosen.append(task)
    needed = {task.id for task in chosen}
    stack = [dep for task in chosen for dep in task.depends_on]
    while stack:
        dep = stack.pop()
        if dep in needed:
            continue
        if dep not in by_id:
            raise ConfigError(f"a task depends on {dep!r}, which the suite does not have")
        needed.add(dep)
        stack.extend(by_id[dep].depends_on)
    _check_acyclic({i: by_id[i].depends_on for i in needed})
    chosen_ids = {task.id for task in chosen}
    runs = []
    for task in tasks:
        if task.id not in needed:
            continue
        scored = task.scored and task.id in chosen_ids
        for trial in range(trials if scored else 1):
            runs.append(PlannedRun(task.id, task.category, scored, task.depends_on, trial))
    return runs


def _check_acyclic(graph: Mapping[str, Sequence[str]]) -> None:
    """``ConfigError`` if the dependencies form a cycle (the runs would wait for each other forever)."""
    done: set[str] = set()
    for root in graph:
        if root in done:
            continue
        on_path = {root}
        path = [(root, iter(graph[root]))]
        while path:
            node, children = path[-1]
            child = next(children, None)
            if child is None:
                done.add(node)
                on_path.discard(node)
                path.pop()
            elif child in on_path:
                raise ConfigError(f"tasks depend on each other in a cycle through {child!r}")
            elif child not in done:
                on_path.add(child)
                path.append((child, iter(graph.get(child, ()))))


# --- playing them ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EpisodeOutcome:
    """One finished run."""

    run: PlannedRun
    verdict: TaskVerdict | None
    """The suite's verdict (None for an unscored run that raised nothing)."""
    error: str | None
    """What the run raised, if anything (a scored run is then failed)."""
    trajectory: Trajectory | None
    """The token trajectory (None when the episode never reached the loop)."""
    transcript: Transcript
    """The conversation as played (as far as it got)."""
    seconds: float


class EpisodeTranscript:
    """Records an episode as it is played (``opening``, then ``reply`` per step), so an episode that
    raises half-way still leaves the conversation it had (the loop's own ``Transcript`` is only
    returned with a finished trajectory)."""

    def __init__(self) -> None:
        self._opening: tuple[Message, ...] = ()
        self._replies: list[Reply] = []

    def opening(self, messages: tuple[Message, ...]) -> None:
        self._opening = tuple(messages)

    def reply(self, text: str, result: StepResult) -> None:
        self._replies.append(Reply.of(text, result))

    def freeze(self) -> Transcript:
        return Transcript.of(self._opening, tuple(self._replies))


class _RecordedEpisode:
    """An episode seen through the recorder; its steps run here (a non-blocking suite)."""

    def __init__(self, episode: Any, opening: tuple[Message, ...], recorder: EpisodeTranscript) -> None:
        self._episode = episode
        self._opening = opening
        self._recorder = recorder

    def start(self) -> tuple[Message, ...]:
        return self._opening  # started already, before the loop (see run_suite)

    def step(self, reply: str) -> StepResult:
        result: StepResult = self._episode.step(reply)
        self._recorder.reply(reply, result)
        return result

    def visible_tools(self) -> tuple[FunctionDoc, ...]:
        tools: tuple[FunctionDoc, ...] = self._episode.visible_tools()
        return tools

    def score(self) -> EpisodeScore:
        score: EpisodeScore = self._episode.score()
        return score


class _OffloadedEpisode(_RecordedEpisode):
    """The same, with each step run on the suite's thread pool (the loop awaits it)."""

    def __init__(
        self,
        episode: Any,
        opening: tuple[Message, ...],
        recorder: EpisodeTranscript,
        call: Callable[..., Any],
    ) -> None:
        super().__init__(episode, opening, recorder)
        self._call = call

    async def step(self, reply: str) -> StepResult:  # type: ignore[override]
        result: StepResult = await self._call(self._episode.step, reply)
        self._recorder.reply(reply, result)
        return result


def verdict_of(
    run: PlannedRun, suite: str, episode: Any, trajectory: Trajectory | None
) -> TaskVerdict | None:
    """The episode's verdict (after ``close``): the suite's own, or BFCL V3's all-turns rule."""
    if not run.scored:
        return None
    own = getattr(episode, "verdict", None)
    if callable(own):
        verdict: TaskVerdict | None = own()
        if verdict is not None:
            return verdict
        truncated = trajectory.truncated if trajectory is not None else None
        return failed_verdict(
            run,
            suite,
            "the episode ended before the task did (a length cap of the sampling config)",
            truncated=truncated,
        )
    if trajectory is None:
        return failed_verdict(run, suite, "no trajectory")
    passed = bool(trajectory.turn_passed) and all(trajectory.turn_passed)
    return TaskVerdict(
        task_id=run.task_id,
        suite=suite,
        category=run.category,
        passed=passed,
        reward=1.0 if passed else 0.0,
        detail={
            "progress": trajectory.progress,
            "turn_passed": list(trajectory.turn_passed),
            "format_reward": trajectory.format_reward,
            "truncated": trajectory.truncated,
        },
    )


def failed_verdict(run: PlannedRun, suite: str, reason: str, **detail: Any) -> TaskVerdict:
    return TaskVerdict(
        task_id=run.task_id,
        suite=suite,
        category=run.category,
        passed=False,
        reward=0.0,
        detail={"error": reason, **detail},
    )


async def run_suite(
    engine: Engine,
    environment: Any,
    chat: ChatTokenizer,
    runs: Sequence[PlannedRun],
    *,
    suite: str,
    agent: AgentConfig,
    episode_config: Any = None,
    concurrency: int = 32,
    blocking: bool = False,
    constraints: ConstraintCache | None = None,
    on_finished: Callable[[EpisodeOutcome], None] | None = None,
) -> list[EpisodeOutcome]:
    """Play ``runs`` on ``environment`` (a suite's); outcomes in the order of ``runs``.

    ``episode_config`` goes to ``make_episode`` (None: the suite's evaluation defaults).
    ``on_finished`` is called on the loop as each run ends (progress displays).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    cache = constraints if constraints is not None else ConstraintCache()
    slots = asyncio.Semaphore(concurrency)
    remaining: dict[str, int] = {}
    for run in runs:
        remaining[run.task_id] = remaining.get(run.task_id, 0) + 1
    ended = {task_id: asyncio.Event() for task_id in remaining}
    executor = (
        ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"eval-{suite}") if blocking else None
    )
    loop = asyncio.get_running_loop()

    async def call(function: Callable[..., T], *args: Any) -> T:
        if executor is None:
            return function(*args)
        return await loop.run_in_executor(executor, function, *args)

    async def one(index: int, run: PlannedRun) -> EpisodeOutcome:
        for dep in run.depends_on:
            event = ended.get(dep)
            if event is not None:  # a dependency left out of the plan: the environment refuses the run
                await event.wait()
        recorder = EpisodeTranscript()
        trajectory: Trajectory | None = None
        verdict: TaskVerdict | None = None
        error: str | None = None
        async with slots:
            started = time.perf_counter()
            try:
                episode = await call(environment.make_episode, run.task_id, episode_config)
                try:
                    opening = await call(episode.start)
                    recorder.opening(opening)
                    if not getattr(episode, "done", False):  # τ²: the user may end it before the agent speaks
                        wrapped = (
                            _RecordedEpisode(episode, opening, recorder)
                            if executor is None
                            else _OffloadedEpisode(episode, opening, recorder, call)
                        )
                        trajectory = await run_episode(
                            engine,
                            wrapped,
                            chat,
                            agent,
                            task_id=run.task_id,
                            group_id=f"eval-{suite}-{index}",
                            constraints=cache,
                        )
                finally:
                    await call(episode.close)
                verdict = verdict_of(run, suite, episode, trajectory)
            except Exception as exc:
                # One run that cannot finish is one failed task, with its reason; the suite goes on.
                error = f"{type(exc).__name__}: {exc}"
                log.warning("eval_episode_failed", suite=suite, task_id=run.task_id, error=error)
                verdict = failed_verdict(run, suite, error) if run.scored else None
            seconds = time.perf_counter() - started
        remaining[run.task_id] -= 1
        if remaining[run.task_id] == 0:
            ended[run.task_id].set()
        outcome = EpisodeOutcome(run, verdict, error, trajectory, recorder.freeze(), seconds)
        if on_finished is not None:
            on_finished(outcome)
        return outcome

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(i, run)) for i, run in enumerate(runs)]
    finally:
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
    return [task.result() for task in tasks]
