"""Rollout actor on a virtual clock: groups, bounds, faults, staleness, shutdown, accounting."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter

import pytest
from envtune.agents.engine import EngineError, GenerateRequest
from envtune.agents.trajectory import Trajectory
from envtune.runtime.actors import Actor, Mailbox, MailboxClosed
from envtune.runtime.records import (
    DropReason,
    GroupsDiscarded,
    IteratorTaskSource,
    PolicyUpdated,
    TaskSpec,
    TrajectoryGroup,
)
from envtune.runtime.reference import run_synchronous_batches
from envtune.runtime.rollout import RolloutActor, RolloutConfig, StalenessGate
from envtune.runtime.supervisor import Supervisor
from envtune.runtime.testing.fake_engine import LatencyModel, LatencyModelEngine, run_virtual
from hypothesis import given, settings
from hypothesis import strategies as st

# --- fakes ------------------------------------------------------------------------------------


def steps_of(task_id: str) -> int:
    """Episode length by task: task ``t7`` takes 1 + 7 % 4 engine calls."""
    return 1 + int(task_id[1:]) % 4


class FakeRunner:
    """An episode runner that awaits the engine ``steps_of(task)`` times and builds a trajectory."""

    def __init__(self, engine: object, fail: dict[str, type[Exception]] | None = None) -> None:
        self.engine = engine
        self.fail = fail or {}
        self.calls: Counter[str] = Counter()
        self.running = 0
        self.peak_running = 0

    async def __call__(self, task: TaskSpec, group_id: str, start_version: int) -> Trajectory:
        self.calls[group_id] += 1
        member = self.calls[group_id] - 1
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        try:
            ids = [1, 2]
            mask = [False, False]
            versions = [-1, -1]
            for _ in range(steps_of(task.task_id)):
                (completion,) = await self.engine.generate(GenerateRequest(prompt_ids=tuple(ids)))
                ids += completion.token_ids
                mask += [True] * len(completion.token_ids)
                versions += [completion.policy_version] * len(completion.token_ids)
            if (error := self.fail.get(f"{task.task_id}/{member}")) is not None:
                raise error("scripted failure")
            return Trajectory(
                task_id=task.task_id,
                group_id=group_id,
                token_ids=tuple(ids),
                loss_mask=tuple(mask),
                behavior_logprobs=tuple(-1.0 if m else 0.0 for m in mask),
                policy_versions=tuple(versions),
                reward=float(member),
                progress=0.0,
                format_reward=1.0,
                tool_reward=1.0,
                turn_passed=(True,),
                step_codes=(1,),
                stage=task.stage,
                start_version=start_version,
            )
        finally:
            self.running -= 1


def make_engine(**kwargs: object) -> LatencyModelEngine:
    return LatencyModelEngine(LatencyModel(fixed_s=1.0, per_token_s=0.1), lambda _r: (5, 6, 7), **kwargs)


def tasks(n: int) -> list[TaskSpec]:
    return [TaskSpec(f"t{i}", stage=1) for i in range(n)]


async def collect(sink: Mailbox[TrajectoryGroup], into: list[TrajectoryGroup]) -> None:
    while True:
        into.append(await sink.receive())  # type: ignore[arg-type]


def check_accounting(actor: RolloutActor, runner: FakeRunner, received: list[TrajectoryGroup]) -> None:
    stats = actor.statistics()
    started = sum(runner.calls.values())
    assert stats.episodes_started == started
    assert stats.in_flight == 0
    assert started == stats.episodes_completed + stats.episodes_dropped
    assert stats.episodes_dropped == sum(stats.dropped_by_reason.values())
    emitted = [(t.group_id, t.reward) for g in received for t in g.trajectories]
    assert len(emitted) == len(set(emitted)) == stats.episodes_completed  # never duplicated
    assert all(t.group_id == g.group_id for g in received for t in g.trajectories)


async def run_to_completion(
    config: RolloutConfig, runner: FakeRunner, specs: list[TaskSpec], sink_size: int = 1000
) -> tuple[RolloutActor, list[TrajectoryGroup]]:
    sink: Mailbox[TrajectoryGroup] = Mailbox("trajectories", sink_size)
    actor = RolloutActor(config, IteratorTaskSource(specs), runner, sink)
    received: list[TrajectoryGroup] = []
    async with asyncio.TaskGroup() as tg:
        consumer = tg.create_task(collect(sink, received))
        run = tg.create_task(actor.run())
        await actor.wait_until_done()
        await actor.stop()
        await run
        consumer.cancel()
    while sink.statistics().depth:
        received.append(await sink.receive())  # type: ignore[arg-type]
    return actor, received


# --- groups, concurrency, reference loop --------------------------------------------------------


def test_groups_are_emitted_whole_with_bounded_concurrency() -> None:
    async def main() -> None:
        engine = make_engine()
        runner = FakeRunner(engine)
        config = RolloutConfig(max_concurrent_episodes=6, group_size=4, max_staleness=None)
        actor, received = await run_to_completion(config, runner, tasks(10))
        assert runner.peak_running == 6
        assert engine.statistics().peak_in_flight == 6
        assert sorted(g.task.task_id for g in received) == sorted(f"t{i}" for i in range(10))
        assert all(len(g.trajectories) == g.size == 4 for g in received)
        assert all(g.start_version == 0 and g.emitted_version == 0 for g in received)
        check_accounting(actor, runner, received)
        stats = actor.statistics()
        assert (stats.groups_started, stats.groups_emitted, stats.groups_dropped) == (10, 10, 0)
        assert stats.generated_tokens == sum(t.num_model_tokens for g in received for t in g.trajectories)

    run_virtual(main())


def test_actor_agrees_with_the_synchronous_reference_loop() -> None:
    """Same groups (task, member rewards, tokens) from the actor and the lock-step reference."""

    def signature(groups: list[TrajectoryGroup] | tuple[TrajectoryGroup, ...]) -> list[object]:
        return sorted(
            (g.task.task_id, tuple(sorted((t.reward, t.token_ids) for t in g.trajectories))) for g in groups
        )

    async def main() -> None:
        fail = {"t3/1": ValueError, "t5/0": ValueError, "t5/1": ValueError, "t5/2": ValueError}
        runner = FakeRunner(make_engine(), fail)
        config = RolloutConfig(max_concurrent_episodes=5, group_size=3, max_staleness=None)
        actor, received = await run_to_completion(config, runner, tasks(8))
        reference = await run_synchronous_batches(
            tasks(8), FakeRunner(make_engine(), fail), group_size=3, groups_per_batch=2
        )
        assert signature(received) == signature(reference.groups)
        assert dict(actor.statistics().dropped_by_reason) == dict(reference.dropped_by_reason)
        assert dict(reference.dropped_by_reason) == {"episode_error": 4}

    run_virtual(main())


def test_synchronous_batches_wait_for_the_slowest_episode() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        # t3 takes 4 calls, t0 takes 1; a batch of both lasts as long as t3 (4 * 1.3 s).
        result = await run_synchronous_batches(
            [TaskSpec("t0"), TaskSpec("t3")] * 2, FakeRunner(make_engine()), group_size=2, groups_per_batch=2
        )
        assert loop.time() - start == pytest.approx(2 * 4 * 1.3)
        assert len(result.groups) == 4 and result.episodes_started == 8

    run_virtual(main())


# --- faults --------------------------------------------------------------------------------------


def test_failed_members_are_dropped_with_their_reason_and_small_groups_dropped() -> None:
    async def main() -> None:
        fail = {"t1/0": KeyError, "t2/0": RuntimeError, "t2/1": RuntimeError, "t2/2": RuntimeError}
        runner = FakeRunner(make_engine(), fail)
        config = RolloutConfig(max_concurrent_episodes=4, group_size=4, min_group_size=2, max_staleness=None)
        actor, received = await run_to_completion(config, runner, tasks(3))
        by_task = {g.task.task_id: g for g in received}
        assert sorted(by_task) == ["t0", "t1"]
        assert len(by_task["t1"].trajectories) == 3 and by_task["t1"].size == 4
        stats = actor.statistics()
        assert dict(stats.dropped_by_reason) == {"episode_error": 4, "group_incomplete": 1}
        assert stats.groups_dropped == 1
        check_accounting(actor, runner, received)

    run_virtual(main())


def test_engine_errors_are_dropped_as_engine_error() -> None:
    async def main() -> None:
        # The client owns retries; what reaches the rollout has failed for good.
        failing = make_engine(fault_fn=lambda r, i: EngineError("down", retryable=True))
        runner = FakeRunner(failing)
        config = RolloutConfig(max_concurrent_episodes=4, group_size=2, max_staleness=None)
        actor, received = await run_to_completion(config, runner, tasks(2))
        assert received == []
        assert dict(actor.statistics().dropped_by_reason) == {"engine_error": 4}
        check_accounting(actor, runner, received)

    run_virtual(main())


def test_episode_timeout_and_invalid_trajectories_are_dropped() -> None:
    async def main() -> None:
        runner = FakeRunner(make_engine())

        async def wrong_group(task: TaskSpec, group_id: str, start_version: int) -> Trajectory:
            trajectory = await runner(task, group_id, start_version)
            return trajectory if task.task_id != "t0" else await runner(task, "other", start_version)

        config = RolloutConfig(
            max_concurrent_episodes=8, group_size=2, max_staleness=None, episode_timeout_s=3.0
        )
        sink: Mailbox[TrajectoryGroup] = Mailbox("trajectories", 10)
        actor = RolloutActor(config, IteratorTaskSource(tasks(4)), wrong_group, sink)
        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(actor.run())
            await actor.wait_until_done()
            await actor.stop()
            await run
        stats = actor.statistics()
        # t0: invalid (wrong group id); t2 (3 calls, 3.9 s) and t3 (4 calls) time out; t1 completes.
        assert dict(stats.dropped_by_reason) == {"invalid_trajectory": 2, "timeout": 4}
        assert stats.episodes_completed == 2 and stats.in_flight == 0

    run_virtual(main())


# --- staleness -----------------------------------------------------------------------------------


@given(
    eta=st.integers(0, 3),
    per_step=st.integers(1, 4),
    v0=st.integers(0, 5),
    ops=st.lists(st.sampled_from(["start", "train", "discard"]), max_size=60),
)
@settings(max_examples=200, deadline=None)
def test_gate_bound_holds_for_in_order_delivery(eta: int, per_step: int, v0: int, ops: list[str]) -> None:
    """Simulate the learner: groups delivered in dispatch order train within eta versions."""
    gate = StalenessGate(eta, per_step, v0)
    version = v0
    queue: list[int] = []  # start versions of groups not yet trained, in dispatch order
    for op in ops:
        if op == "start" and gate.admits(version):
            gate.started += 1
            queue.append(version)
        elif op == "discard" and queue:
            queue.pop()  # the newest group is dropped before training; its slot comes back
            gate.discarded += 1
        elif op == "train" and len(queue) >= per_step:
            batch, queue = queue[:per_step], queue[per_step:]
            assert all(version - start <= eta for start in batch)
            version += 1
    assert gate.capacity(version) is not None and gate.capacity(version) >= 0  # type: ignore[operator]


def test_gate_rule_numbers() -> None:
    gate = StalenessGate(max_staleness=1, groups_per_step=2, initial_version=10)
    assert gate.capacity(10) == 4  # (1 + 0 + 1) * 2
    gate.started = 4
    assert not gate.admits(10) and gate.admits(11)
    gate.discarded = 1
    assert gate.capacity(10) == 1
    assert gate.is_stale(start_version=10, version=12) and not gate.is_stale(10, 11)
    assert StalenessGate(None, 2, 0).capacity(0) is None


class ToyLearner(Actor[TrajectoryGroup]):
    """Trains every ``per_step`` groups (takes ``step_s``), then publishes the next version."""

    accepts = (TrajectoryGroup,)

    def __init__(self, rollout: RolloutActor, per_step: int, eta: int, step_s: float) -> None:
        super().__init__("learner", mailbox_size=2)
        self.rollout = rollout
        self.per_step = per_step
        self.eta = eta
        self.step_s = step_s
        self.version = 0
        self.batch: list[TrajectoryGroup] = []
        self.trained: list[tuple[str, int]] = []
        self.discarded = 0

    async def handle(self, message: TrajectoryGroup) -> None:
        if self.version - message.start_version > self.eta:
            self.discarded += 1
            with contextlib.suppress(MailboxClosed):  # the rollout may have stopped already
                await self.rollout.send(GroupsDiscarded(1, DropReason.STALE))
            return
        self.batch.append(message)
        if len(self.batch) == self.per_step:
            self.trained += [(g.group_id, self.version - g.start_version) for g in self.batch]
            self.batch.clear()
            await asyncio.sleep(self.step_s)
            self.version += 1
            with contextlib.suppress(MailboxClosed):  # after the rollout stopped, nobody needs it
                await self.rollout.send(PolicyUpdated(self.version))


@pytest.mark.parametrize("eta", [0, 1, 3])
def test_staleness_bound_end_to_end(eta: int) -> None:
    async def main() -> None:
        runner = FakeRunner(make_engine())
        config = RolloutConfig(
            max_concurrent_episodes=64, group_size=2, max_staleness=eta, groups_per_step=3, min_group_size=1
        )
        sink: Mailbox[TrajectoryGroup] = Mailbox("unused", 1)
        actor = RolloutActor(config, IteratorTaskSource(tasks(60)), runner, sink)
        learner = ToyLearner(actor, per_step=3, eta=eta, step_s=2.0)
        actor._sink = learner  # the learner's mailbox is the trajectory queue
        peak_live = 0

        async def watch() -> None:
            nonlocal peak_live
            while True:
                s = actor.statistics()
                bound = (eta + s.policy_version + 1) * 3
                assert s.groups_started - s.groups_dropped - learner.discarded <= bound
                peak_live = max(peak_live, s.groups_started)
                await asyncio.sleep(0.05)

        async def until_done() -> None:
            async with asyncio.TaskGroup() as tg:
                watcher = tg.create_task(watch())
                await actor.wait_until_done()
                watcher.cancel()

        await Supervisor([learner, actor]).run(until_done())
        assert learner.trained, "nothing trained"
        assert max(s for _, s in learner.trained) <= eta
        if eta == 0:
            assert {s for _, s in learner.trained} == {0}  # on-policy: lock-step
        stats = actor.statistics()
        assert stats.episodes_started == stats.episodes_completed + stats.episodes_dropped

    run_virtual(main())


@pytest.mark.parametrize("abort_stale", [True, False])
def test_groups_that_age_out_are_dropped_and_give_capacity_back(abort_stale: bool) -> None:
    async def main() -> None:
        runner = FakeRunner(make_engine())
        config = RolloutConfig(
            max_concurrent_episodes=8,
            group_size=2,
            max_staleness=1,
            groups_per_step=1,
            abort_stale=abort_stale,
        )
        sink: Mailbox[TrajectoryGroup] = Mailbox("trajectories", 10)
        # t3 takes 4 calls (5.2 s); the version jumps by 2 while it runs.
        actor = RolloutActor(config, IteratorTaskSource([TaskSpec("t3")]), runner, sink)
        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(actor.run())
            await asyncio.sleep(1.0)
            assert actor.statistics().admission_capacity == 1  # (1 + 0 + 1) * 1 - 1 live
            await actor.send(PolicyUpdated(2))
            await actor.wait_until_done()
            done_at = asyncio.get_running_loop().time()
            await actor.stop()
            await run
        stats = actor.statistics()
        assert dict(stats.dropped_by_reason) == {"stale": 2}
        assert stats.groups_dropped == 1 and sink.statistics().sent == 0
        # Aborted: both members cancelled at once (t = 1 s) instead of running to 5.2 s.
        assert stats.episodes_aborted == (2 if abort_stale else 0)
        assert done_at == pytest.approx(1.0 if abort_stale else 5.2)
        assert stats.admission_capacity == 4  # (1 + 2 + 1) * 1 - 0 live
        with pytest.raises(ValueError, match="went back"):
            await actor.handle(PolicyUpdated(1))

    run_virtual(main())


class RecordingPins:
    """GroupPins that pin the version it is told is current and record every pin and unpin."""

    def __init__(self) -> None:
        self.current: int | None = None
        self.pinned: dict[str, int | None] = {}
        self.unpinned: list[str] = []

    def pin(self, group_id: str) -> int | None:
        assert group_id not in self.pinned
        self.pinned[group_id] = self.current
        return self.current

    async def unpin(self, group_id: str) -> None:
        assert group_id in self.pinned and group_id not in self.unpinned
        await asyncio.sleep(0)
        self.unpinned.append(group_id)


class PinnedRunner(FakeRunner):
    """Records the version each member was handed (its group's pinned start version)."""

    def __init__(self, engine: object, **kwargs: object) -> None:
        super().__init__(engine, **kwargs)  # type: ignore[arg-type]
        self.seen: dict[str, set[int]] = {}

    async def __call__(self, task: TaskSpec, group_id: str, start_version: int) -> Trajectory:
        self.seen.setdefault(group_id, set()).add(start_version)
        return await super().__call__(task, group_id, start_version)


def test_a_group_is_pinned_to_one_version_from_dispatch_to_its_end() -> None:
    async def main() -> None:
        runner = PinnedRunner(make_engine())
        pins = RecordingPins()
        pins.current = 0
        # One episode at a time: a group's members start far apart, across version changes.
        config = RolloutConfig(max_concurrent_episodes=1, group_size=3, max_staleness=None, min_group_size=1)
        sink: Mailbox[TrajectoryGroup] = Mailbox("trajectories", 1000)
        actor = RolloutActor(config, IteratorTaskSource(tasks(6)), runner, sink, pins=pins)
        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(actor.run())
            for version in range(1, 8):
                await asyncio.sleep(2.0)
                pins.current = version
                await actor.send(PolicyUpdated(version))
            await actor.wait_until_done()
            await actor.stop()
            await run
        received = [await sink.receive() for _ in range(sink.statistics().depth)]
        assert len(received) == 6
        for group in received:
            assert group.start_version == pins.pinned[group.group_id]  # type: ignore[union-attr]
            assert runner.seen[group.group_id] == {group.start_version}  # type: ignore[union-attr]
        assert len({g.start_version for g in received}) > 2  # type: ignore[union-attr]
        assert sorted(pins.unpinned) == sorted(pins.pinned)  # every group let its version go

    run_virtual(main())


def test_aborting_an_open_group_starts_no_more_members_and_unpins_it() -> None:
    async def main() -> None:
        runner = PinnedRunner(make_engine())
        pins = RecordingPins()
        pins.current = 0
        # t3 runs 5.2 s; one slot: member 2 of the group cannot start before member 1 ends.
        config = RolloutConfig(max_concurrent_episodes=1, group_size=3, max_staleness=0, groups_per_step=1)
        sink: Mailbox[TrajectoryGroup] = Mailbox("trajectories", 10)
        actor = RolloutActor(config, IteratorTaskSource([TaskSpec("t3")]), runner, sink, pins=pins)
        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(actor.run())
            await asyncio.sleep(1.0)
            await actor.send(PolicyUpdated(1))
            await actor.wait_until_done()
            await actor.stop()
            await run
        stats = actor.statistics()
        assert stats.episodes_started == 1 and stats.episodes_aborted == 1
        assert dict(stats.dropped_by_reason) == {"stale": 1} and stats.groups_dropped == 1
        assert pins.unpinned == list(pins.pinned)

    run_virtual(main())


def test_saved_tokens_are_estimated_from_completed_episodes() -> None:
    async def main() -> None:
        runner = FakeRunner(make_engine())
        # Two slots: t0's members (1 call: 1.3 s, 3 tokens each) run first, t3's start at 1.3 s.
        config = RolloutConfig(max_concurrent_episodes=2, group_size=2, max_staleness=1, groups_per_step=1)
        sink: Mailbox[TrajectoryGroup] = Mailbox("trajectories", 10)
        actor = RolloutActor(config, IteratorTaskSource([TaskSpec("t0"), TaskSpec("t3")]), runner, sink)
        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(actor.run())
            await asyncio.sleep(1.5)
            await actor.send(PolicyUpdated(2))  # t3 (dispatched under 0) can no longer be trained
            await actor.wait_until_done()
            await actor.stop()
            await run
        stats = actor.statistics()
        assert stats.episodes_completed == 2 and stats.episodes_aborted == 2
        # Per aborted member: 3 tokens (the completed mean) x (1 - 0.2 s run / 1.3 s mean duration).
        assert stats.tokens_saved_estimate == pytest.approx(2 * 3 * (1 - 0.2 / 1.3), rel=1e-6)

    run_virtual(main())


# --- backpressure and shutdown ---------------------------------------------------------------------


def test_a_full_trajectory_queue_stops_dispatch() -> None:
    async def main() -> None:
        runner = FakeRunner(make_engine())
        config = RolloutConfig(max_concurrent_episodes=4, group_size=1, min_group_size=1, max_staleness=None)
        sink: Mailbox[TrajectoryGroup] = Mailbox("trajectories", 2)
        actor = RolloutActor(config, IteratorTaskSource(tasks(1000)), runner, sink)
        received: list[TrajectoryGroup] = []
        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(actor.run())
            await asyncio.sleep(100.0)  # nobody consumes
            stats = actor.statistics()
            # 2 groups queued; 4 finished episodes hold their slots waiting for room: dispatch stops.
            assert sink.statistics().depth == 2 and sink.statistics().blocked_senders == 4
            assert (stats.episodes_started, stats.episodes_running, stats.in_flight) == (6, 0, 4)
            consumer = tg.create_task(collect(sink, received))
            await actor.stop()
            await run
            await asyncio.sleep(0)
            consumer.cancel()
        stats = actor.statistics()
        assert stats.episodes_completed == 6 and stats.episodes_dropped == 0
        check_accounting(actor, runner, received)

    run_virtual(main())


@pytest.mark.parametrize("drain_timeout_s", [0.0, 2.5, 100.0])
def test_stop_drains_or_cancels_in_flight_and_accounts_every_episode(drain_timeout_s: float) -> None:
    async def main() -> None:
        runner = FakeRunner(make_engine())
        config = RolloutConfig(
            max_concurrent_episodes=16, group_size=4, max_staleness=None, drain_timeout_s=drain_timeout_s
        )
        sink: Mailbox[TrajectoryGroup] = Mailbox("trajectories", 1000)
        specs = [TaskSpec(f"t{random.Random(i).randrange(8)}") for i in range(1000)]
        actor = RolloutActor(config, IteratorTaskSource(specs), runner, sink)
        received: list[TrajectoryGroup] = []
        async with asyncio.TaskGroup() as tg:
            consumer = tg.create_task(collect(sink, received))
            run = tg.create_task(actor.run())
            await asyncio.sleep(3.0)
            await actor.stop()
            await run
            await asyncio.sleep(0)
            consumer.cancel()
        stats = actor.statistics()
        check_accounting(actor, runner, received)
        cancelled = stats.dropped_by_reason.get("cancelled", 0)
        if drain_timeout_s == 100.0:
            assert cancelled == 0 and stats.episodes_completed == stats.episodes_started
        if drain_timeout_s == 0.0:
            assert cancelled > 0
        assert not stats.dispatching
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run_virtual(main())


def test_cancelling_the_actor_accounts_every_episode() -> None:
    async def main() -> None:
        runner = FakeRunner(make_engine())
        config = RolloutConfig(max_concurrent_episodes=10, group_size=4, max_staleness=None)
        sink: Mailbox[TrajectoryGroup] = Mailbox("trajectories", 1000)
        actor = RolloutActor(config, IteratorTaskSource(tasks(100)), runner, sink)
        run = asyncio.create_task(actor.run())
        await asyncio.sleep(4.0)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        stats = actor.statistics()
        emitted = 0
        while sink.statistics().depth:
            emitted += len((await sink.receive()).trajectories)  # type: ignore[union-attr]
        assert stats.in_flight == 0 and stats.episodes_started == sum(runner.calls.values())
        assert stats.episodes_completed == emitted
        assert stats.episodes_started == stats.episodes_completed + stats.episodes_dropped
        assert stats.dropped_by_reason["cancelled"] > 0
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run_virtual(main())


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="min_group_size"):
        RolloutConfig(group_size=2, min_group_size=3)
    with pytest.raises(ValueError, match="max_concurrent_episodes"):
        RolloutConfig(max_concurrent_episodes=0)
    with pytest.raises(ValueError, match="max_staleness"):
        RolloutConfig(max_staleness=-1)
