"""The rollout actor: runs GRPO groups of episodes concurrently and hands finished groups on.

Dispatch, the staleness gate and the per-episode accounting share one piece of state (who is in
flight, under which version) and read best together in this one module.

* **One task per episode**, all owned by the actor's TaskGroup, at most
  ``max_concurrent_episodes`` at once (a semaphore). Episodes are run by an injected
  ``EpisodeRunner``; the runtime never looks inside one.
* **Groups.** Each task drawn from the ``TaskSource`` becomes a group of ``group_size`` episodes
  stamped with the policy version current at dispatch (``start_version``). A group is emitted to
  the trajectory sink (the learner's bounded mailbox) only when every member has ended. Members
  that failed are dropped; the rest are emitted if at least ``min_group_size`` remain (GRPO needs
  two rewards to form an advantage), otherwise the whole group is dropped as ``group_incomplete``.
* **Staleness bound at dispatch** (``StalenessGate``, AReaL's rule in group units): see there.
  A group that ages out anyway (groups finished out of order) can never be trained: when a new
  policy version arrives, its running episodes are cancelled (the engine aborts their requests) and
  it is dropped as ``stale`` (``abort_stale``; otherwise it runs on and is dropped at emission).
  The tokens this saves are estimated from the completed episodes' length and duration.
* **One policy per group.** With ``GroupPins`` the policy current at dispatch is pinned to the group:
  every member samples under it and it stays loaded until the group ends (``start_version`` is then
  exactly the version the group sampled under).
* **Backpressure.** The last member of a group holds its concurrency slot until the sink accepted
  the group, so a full trajectory queue stops dispatch instead of piling up finished groups.
* **Accounting.** Every episode started ends exactly once, as *completed* (emitted in a group)
  or *dropped* with a ``DropReason``. ``started == completed + dropped + in_flight`` at every
  await point.
* **Shutdown.** On ``Stop``: dispatch ends, in-flight episodes get ``drain_timeout_s`` to finish,
  the rest are cancelled (dropped as ``cancelled``); finished groups are still emitted.
* **An engine that is gone** (``EngineUnavailable``: its client's circuit breaker tripped) is not
  one episode's failure: dispatch stops, ``engine_failure`` keeps the error and ``failed`` is set,
  so the owner ends the run with it. Other engine errors are throttled to a line per interval.

Left out: engine retries (the engine client owns them) and environment failures (the episode turns
them into error observations). ``runtime.reference.run_synchronous_batches`` is the reference loop:
the same work in lock-step batches.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import structlog
from envtune.agents.engine import EngineError, EngineUnavailable
from envtune.agents.trajectory import Trajectory
from envtune.runtime.actors import Actor, ActorStatistics
from envtune.runtime.logs import LogThrottle
from envtune.runtime.records import (
    DropReason,
    EpisodeRunner,
    GroupPins,
    GroupsDiscarded,
    GroupSink,
    PolicyUpdated,
    TaskSource,
    TrajectoryGroup,
    is_stale,
)

log = structlog.get_logger(__name__)

RolloutMessage = PolicyUpdated | GroupsDiscarded


# --------------------------------------------------------------------------------------------
# Configuration and the staleness gate


@dataclass(frozen=True, slots=True)
class RolloutConfig:
    """How the rollout actor dispatches and accounts episodes (the run config's ``rollout`` section)."""

    group_size: int = 16
    """n, episodes per task in a GRPO group (the release's ``rollout.n`` = 16)."""
    min_group_size: int = 2
    """Fewest completed members a group may be emitted with (GRPO needs two rewards to compare)."""
    groups_per_step: int = 32
    """Groups per learner step (the release's ``train_batch_size`` = 32 prompts); the staleness
    gate counts admissions in these units and the learner trains on this many."""
    max_staleness: int | None = 1
    """eta: most learner versions between a group's dispatch and the step that trains it (AReaL's
    bound); ``none`` is unbounded (no gate, no stale drops)."""
    max_concurrent_episodes: int = 1024
    """Episodes running at once (each holds one engine request; bounds engine load and memory);
    1024 = 64 groups of 16 in flight."""
    episode_timeout_s: float | None = None
    """Per-episode wall-clock limit (``none``: no limit); an episode over it is dropped as ``timeout``."""
    drain_timeout_s: float = 0.0
    """On stop, how long in-flight episodes may run before they are cancelled. 0 for training: an
    episode still running when the run ends would never be trained."""
    abort_stale: bool = True
    """Cancel the running episodes of a group as soon as a new policy version makes it too stale to
    train (the engine aborts their requests); false lets it run to the end and drops it then."""
    mailbox_size: int = 64
    """Bound of the actor's control mailbox."""

    def __post_init__(self) -> None:
        if self.max_concurrent_episodes < 1:
            raise ValueError(f"max_concurrent_episodes must be >= 1, got {self.max_concurrent_episodes}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if not 1 <= self.min_group_size <= self.group_size:
            raise ValueError(f"min_group_size must be in [1, group_size], got {self.min_group_size}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 or None, got {self.max_staleness}")
        if self.groups_per_step < 1:
            raise ValueError(f"groups_per_step must be >= 1, got {self.groups_per_step}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if self.episode_timeout_s is not None and not self.episode_timeout_s > 0:
            raise ValueError(f"episode_timeout_s must be > 0 or None, got {self.episode_timeout_s}")


class StalenessGate:
    """Admits a new group only if it can be trained within ``max_staleness`` versions.

    Rule (AReaL's capacity rule, in groups): with B = ``groups_per_step``, eta = ``max_staleness``,
    v0 the version the gate was created at and v the current version, a group may start iff

        live + 1 <= (eta + (v - v0) + 1) * B,   live = groups started - groups discarded,

    where a discarded group is one that will never reach the learner (dropped here, or reported
    by the learner through ``GroupsDiscarded``). Why it holds: the learner trains the k-th group
    it receives (k = 0, 1, ...) in step floor(k / B), at version v0 + floor(k / B). If groups reach
    it in dispatch order, a group admitted under v has k <= live < (eta + v - v0 + 1) * B, so it is
    trained at a version <= v + eta. Groups finishing out of order can break this; the rollout
    drops those at emission and the learner at consumption (both count ``stale``).
    """

    def __init__(self, max_staleness: int | None, groups_per_step: int, initial_version: int) -> None:
        self.max_staleness = max_staleness
        self.groups_per_step = groups_per_step
        self.initial_version = initial_version
        self.started = 0
        self.discarded = 0

    def capacity(self, version: int) -> int | None:
        """Groups that may still start under ``version`` (None when unbounded)."""
        if self.max_staleness is None:
            return None
        allowed = (self.max_staleness + (version - self.initial_version) + 1) * self.groups_per_step
        return allowed - (self.started - self.discarded)

    def admits(self, version: int) -> bool:
        capacity = self.capacity(version)
        return capacity is None or capacity >= 1

    def is_stale(self, start_version: int, version: int) -> bool:
        """True when a group started under ``start_version`` can no longer train within the bound."""
        return is_stale(start_version, version, self.max_staleness)


# --------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True, slots=True)
class RolloutStatistics(ActorStatistics):
    """A snapshot of the rollout actor (the actor's own fields, then the rollout's)."""

    episodes_started: int
    """Episodes handed to the runner."""
    episodes_completed: int
    """Episodes emitted in a group."""
    episodes_dropped: int
    """Episodes that ended without being emitted (sum of ``dropped_by_reason``)."""
    dropped_by_reason: Mapping[DropReason, int]
    """Dropped episodes per reason."""
    in_flight: int
    """Started and not yet completed or dropped (running, or done and waiting for its group)."""
    episodes_running: int
    """Episodes whose runner is still running."""
    groups_started: int
    """Groups dispatched."""
    groups_emitted: int
    """Groups accepted by the sink."""
    groups_dropped: int
    """Groups that ended without being emitted."""
    policy_version: int
    """Version the actor believes the engine serves."""
    generated_tokens: int
    """Model-sampled tokens in completed episodes."""
    episodes_aborted: int
    """Running episodes cancelled because their group aged out (also counted as dropped ``stale``)."""
    tokens_saved_estimate: float
    """Model tokens those aborts saved, estimated: per aborted episode, the mean tokens of a completed
    episode times the part of a mean episode's duration it had not yet run."""
    staleness_at_emission: Mapping[int, int]
    """Emitted groups per (version at emission - start version)."""
    admission_capacity: int | None
    """Groups the staleness gate would still admit now (None: unbounded)."""
    dispatching: bool
    """True while the dispatcher may start more groups."""


# --------------------------------------------------------------------------------------------
# The actor


@dataclass(slots=True, eq=False)
class _Group:
    """A dispatched group being filled and waiting for its members (internal, mutable)."""

    group_id: str
    task: Any
    start_version: int
    started: int = 0
    resolved: int = 0
    open: bool = True
    aborted: bool = False
    trajectories: list[Trajectory] = field(default_factory=list)
    episodes: dict[asyncio.Task[None], float] = field(default_factory=dict)
    """Running member tasks and the loop time each started."""


class RolloutActor(Actor[RolloutMessage]):
    """Dispatches groups, runs episodes, emits finished groups (see the module docstring)."""

    accepts = (PolicyUpdated, GroupsDiscarded)

    def __init__(
        self,
        config: RolloutConfig,
        tasks: TaskSource,
        run_episode: EpisodeRunner,
        trajectories: GroupSink,
        *,
        policy_version: int = 0,
        pins: GroupPins | None = None,
        name: str = "rollout",
    ) -> None:
        super().__init__(name, config.mailbox_size)
        self.config = config
        self._tasks = tasks
        self._run_episode = run_episode
        self._sink = trajectories
        self._pins = pins
        self._version = policy_version
        self._gate = StalenessGate(config.max_staleness, config.groups_per_step, policy_version)
        self._slots = asyncio.Semaphore(config.max_concurrent_episodes)
        self._capacity_changed = asyncio.Event()
        self._done = asyncio.Event()
        self._group_ids = itertools.count()
        self._groups: dict[str, _Group] = {}
        self._open_group: _Group | None = None
        self._episode_tasks: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._dispatching = False
        self._started = 0
        self._episodes_running = 0
        self._completed = 0
        self._dropped: Counter[DropReason] = Counter()
        self._groups_emitted = 0
        self._groups_dropped = 0
        self._tokens = 0
        self._staleness: Counter[int] = Counter()
        self._aborted = 0
        self._saved_estimate = 0.0
        self._episode_seconds = 0.0
        """Summed duration of completed episodes (with ``_completed_runs``: the mean duration)."""
        self._completed_runs = 0
        self._throttle = LogThrottle()
        self.engine_failure: EngineUnavailable | None = None
        """The error that ended dispatch because the engine is gone (None while it is there)."""
        self.failed = asyncio.Event()
        """Set with ``engine_failure``."""

    # -- public -------------------------------------------------------------------------------

    async def wait_until_done(self) -> None:
        """Wait until the task source is exhausted and every group has ended."""
        await self._done.wait()

    def statistics(self) -> RolloutStatistics:
        dropped = sum(self._dropped.values())
        actor = super().statistics()
        return RolloutStatistics(
            name=actor.name,
            mailbox=actor.mailbox,
            processed=actor.processed,
            running=actor.running,
            episodes_started=self._started,
            episodes_completed=self._completed,
            episodes_dropped=dropped,
            dropped_by_reason=MappingProxyType(dict(self._dropped)),
            in_flight=self._started - self._completed - dropped,
            episodes_running=self._episodes_running,
            groups_started=self._gate.started,
            groups_emitted=self._groups_emitted,
            groups_dropped=self._groups_dropped,
            policy_version=self._version,
            generated_tokens=self._tokens,
            episodes_aborted=self._aborted,
            tokens_saved_estimate=self._saved_estimate,
            staleness_at_emission=MappingProxyType(dict(sorted(self._staleness.items()))),
            admission_capacity=self._gate.capacity(self._version),
            dispatching=self._dispatching,
        )

    # -- actor plumbing -------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                self._dispatching = True
                self._dispatcher = group.create_task(self._dispatch(group), name=f"{self.name}:dispatch")
                await super().run()
        finally:
            self._dispatching = False
            await self._abandon_unfinished_groups()
            self._done.set()

    async def handle(self, message: RolloutMessage) -> None:
        match message:
            case PolicyUpdated(version=version):
                if version < self._version:
                    raise ValueError(f"policy version went back from {self._version} to {version}")
                self._version = version
                self._capacity_changed.set()
                if self.config.abort_stale:
                    self._abort_stale_groups()
            case GroupsDiscarded(count=count, reason=reason):
                self._gate.discarded += count
                log.debug("rollout.groups_discarded", count=count, reason=str(reason))
                self._capacity_changed.set()
            case _:
                raise TypeError(f"{self.name}: unexpected message {message!r}")

    async def on_stop(self, reason: str) -> None:
        """Stop dispatching, let in-flight episodes finish (bounded), cancel the rest."""
        assert self._dispatcher is not None
        self._dispatcher.cancel()
        await asyncio.wait({self._dispatcher})
        self._dispatching = False
        group = self._open_group
        if group is not None:
            # The dispatcher stopped half way through starting this group: it is as big as it got.
            self._open_group = None
            group.open = False
            if group.started == 0:
                self._groups.pop(group.group_id)
                self._gate.discarded += 1
                await self._unpin(group)
            elif group.resolved == group.started:
                await self._finalize(group)
        if self._episode_tasks:
            _, pending = await asyncio.wait(set(self._episode_tasks), timeout=self.config.drain_timeout_s)
            for episode in pending:
                episode.cancel()
            if pending:
                await asyncio.wait(pending)
                log.info("rollout.cancelled_in_flight", episodes=len(pending), reason=reason)
        # Groups whose last member was cancelled have nobody left to emit them: do it here, while
        # the learner (stopped after us) still takes groups.
        for group in list(self._groups.values()):
            if not group.open and group.resolved == group.started:
                await self._finalize(group)
        self._check_done()

    # -- dispatch -------------------------------------------------------------------------------

    async def _dispatch(self, owner: asyncio.TaskGroup) -> None:
        while True:
            while not self._gate.admits(self._version):
                self._capacity_changed.clear()
                await self._capacity_changed.wait()
            spec = await self._tasks.next_task()
            if spec is None:
                break
            group_id = f"{self.name}-{next(self._group_ids):07d}"
            pinned = self._pins.pin(group_id) if self._pins is not None else None
            group = _Group(group_id, spec, self._version if pinned is None else pinned)
            self._gate.started += 1
            self._groups[group.group_id] = group
            self._open_group = group
            loop = asyncio.get_running_loop()
            for index in range(self.config.group_size):
                await self._slots.acquire()
                if group.aborted:  # aged out before all its members started: start no more
                    self._slots.release()
                    break
                group.started += 1
                self._started += 1
                self._episodes_running += 1
                episode = owner.create_task(self._episode(group), name=f"{group.group_id}/{index}")
                group.episodes[episode] = loop.time()
                self._episode_tasks.add(episode)
                episode.add_done_callback(self._episode_tasks.discard)
                episode.add_done_callback(group.episodes.pop)
            group.open = False
            self._open_group = None
            if group.resolved == group.started:
                await self._finalize(group)
        self._dispatching = False
        log.info("rollout.source_exhausted", groups=self._gate.started)
        self._check_done()

    # -- one episode ----------------------------------------------------------------------------

    async def _episode(self, group: _Group) -> None:
        try:
            reason = await self._run_one(group)
            self._episodes_running -= 1
            group.resolved += 1
            if reason is not None:
                self._drop(reason)
            if not group.open and group.resolved == group.started:
                await self._finalize(group)
        finally:
            self._slots.release()

    async def _run_one(self, group: _Group) -> DropReason | None:
        """Run the episode; its trajectory joins the group, or the drop reason comes back."""
        started = asyncio.get_running_loop().time()
        try:
            if self.config.episode_timeout_s is None:
                trajectory = await self._run_episode(group.task, group.group_id, group.start_version)
            else:
                async with asyncio.timeout(self.config.episode_timeout_s):
                    trajectory = await self._run_episode(group.task, group.group_id, group.start_version)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if group.aborted and task is not None and task.uncancel() == 0:
                return DropReason.STALE  # our own abort (and nothing else cancelled the task)
            self._episodes_running -= 1
            group.resolved += 1
            self._drop(DropReason.CANCELLED)
            raise
        except TimeoutError:
            return DropReason.TIMEOUT
        except EngineUnavailable as exc:
            self._engine_lost(exc)
            return DropReason.ENGINE_ERROR
        except EngineError as exc:
            if (held := self._throttle.allow("engine_error")) is not None:
                log.warning("rollout.engine_error", group_id=group.group_id, error=str(exc), held_back=held)
            return DropReason.ENGINE_ERROR
        except Exception as exc:  # a bad rollout is data: counted, logged, not a crash
            if (held := self._throttle.allow("episode_failed")) is not None:
                log.warning(
                    "rollout.episode_failed", group_id=group.group_id, error=repr(exc), held_back=held
                )
            return DropReason.EPISODE_ERROR
        if (
            not isinstance(trajectory, Trajectory)
            or trajectory.group_id != group.group_id
            or trajectory.task_id != group.task.task_id
        ):
            log.error("rollout.invalid_trajectory", group_id=group.group_id, got=type(trajectory).__name__)
            return DropReason.INVALID_TRAJECTORY
        group.trajectories.append(trajectory)
        self._episode_seconds += asyncio.get_running_loop().time() - started
        self._completed_runs += 1
        return None

    def _engine_lost(self, error: EngineUnavailable) -> None:
        if self.engine_failure is None:
            self.engine_failure = error
            log.error("rollout.engine_unavailable", error=str(error))
            if self._dispatcher is not None:
                self._dispatcher.cancel()  # its task group ignores a cancelled child
            self.failed.set()

    # -- groups ---------------------------------------------------------------------------------

    async def _finalize(self, group: _Group) -> None:
        """Emit a fully resolved group, or drop it; exactly once per group."""
        del self._groups[group.group_id]
        await self._unpin(group)
        members = tuple(group.trajectories)
        group.trajectories.clear()
        if self._gate.is_stale(group.start_version, self._version):
            self._drop_group(members, DropReason.STALE)
        elif len(members) < self.config.min_group_size:
            self._drop_group(members, DropReason.GROUP_INCOMPLETE)
        else:
            out = TrajectoryGroup(
                group_id=group.group_id,
                task=group.task,
                start_version=group.start_version,
                trajectories=members,
                size=group.started,
                emitted_version=self._version,
            )
            try:
                await self._sink.send(out)
            except asyncio.CancelledError:
                self._drop_group(members, DropReason.CANCELLED)
                raise
            except Exception as exc:  # the sink refused (closed): count, never lose silently
                log.error("rollout.emit_failed", group_id=group.group_id, error=repr(exc))
                self._drop_group(members, DropReason.EMIT_FAILED)
            else:
                self._completed += len(members)
                self._groups_emitted += 1
                self._tokens += sum(t.num_model_tokens for t in members)
                self._staleness[self._version - group.start_version] += 1
        self._check_done()

    def _drop(self, reason: DropReason, episodes: int = 1) -> None:
        if episodes:
            self._dropped[reason] += episodes

    def _drop_group(self, members: tuple[Trajectory, ...], reason: DropReason) -> None:
        self._drop(reason, len(members))
        self._groups_dropped += 1
        self._gate.discarded += 1
        self._capacity_changed.set()

    async def _abandon_unfinished_groups(self) -> None:
        """On cancellation: finished members of groups that never finalized are dropped."""
        groups = list(self._groups.values())
        for group in groups:
            self._drop_group(tuple(group.trajectories), DropReason.CANCELLED)
            group.trajectories.clear()
        self._groups.clear()
        self._open_group = None
        for group in groups:
            await self._unpin(group)

    async def _unpin(self, group: _Group) -> None:
        if self._pins is None:
            return
        try:
            await self._pins.unpin(group.group_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failed unload must not take the rollout down
            log.warning("rollout.unpin_failed", group_id=group.group_id, error=repr(exc))

    def _abort_stale_groups(self) -> None:
        """Cancel the running members of every group the current version made untrainable."""
        now = asyncio.get_running_loop().time()
        tokens = self._tokens / self._completed if self._completed else 0.0
        seconds = self._episode_seconds / self._completed_runs if self._completed_runs else 0.0
        for group in self._groups.values():
            if group.aborted or not self._gate.is_stale(group.start_version, self._version):
                continue
            group.aborted = True
            for episode, started in group.episodes.items():
                if episode.done():
                    continue
                episode.cancel()
                self._aborted += 1
                if seconds > 0:
                    self._saved_estimate += tokens * max(0.0, 1.0 - (now - started) / seconds)
            log.info(
                "rollout.group_aborted", group_id=group.group_id, start_version=group.start_version,
                version=self._version, episodes=len(group.episodes),
            )

    def _check_done(self) -> None:
        if not self._dispatching and not self._groups and self._episodes_running == 0:
            self._done.set()
