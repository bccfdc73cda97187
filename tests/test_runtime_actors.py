"""Actor base, mailbox and supervisor: bounds, backpressure, stop order, no task left behind."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from envtune.runtime.actors import Actor, Mailbox, MailboxClosed, MailboxFull, Stop
from envtune.runtime.supervisor import STOP_ORDER, Supervisor
from envtune.runtime.testing.fake_engine import run_virtual


@dataclass(frozen=True, slots=True)
class Ping:
    value: int


@dataclass(frozen=True, slots=True)
class Other:
    pass


class Recorder(Actor[Ping]):
    """Records what it handles; optionally slow, optionally failing on a value."""

    accepts = (Ping,)

    def __init__(self, name: str, log: list[str], *, size: int = 4, delay_s: float = 0.0, fail_on: int = -1):
        super().__init__(name, size)
        self.log = log
        self.seen: list[int] = []
        self.delay_s = delay_s
        self.fail_on = fail_on

    async def handle(self, message: Ping) -> None:
        match message:
            case Ping(value=value):
                if value == self.fail_on:
                    raise RuntimeError(f"{self.name} failed on {value}")
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                self.seen.append(value)

    async def on_stop(self, reason: str) -> None:
        self.log.append(self.name)


async def test_mailbox_is_bounded_and_send_nowait_raises_when_full() -> None:
    box: Mailbox[Ping] = Mailbox("m", 2, (Ping,))
    box.send_nowait(Ping(1))
    box.send_nowait(Ping(2))
    with pytest.raises(MailboxFull):
        box.send_nowait(Ping(3))
    stats = box.statistics()
    assert (stats.depth, stats.capacity, stats.peak_depth, stats.sent) == (2, 2, 2, 2)


async def test_mailbox_rejects_unexpected_types_and_bad_bounds() -> None:
    box: Mailbox[Ping] = Mailbox("m", 1, (Ping,))
    with pytest.raises(TypeError, match="accepts Ping, Stop; got Other"):
        box.send_nowait(Other())  # type: ignore[arg-type]
    box.send_nowait(Stop())  # Stop is always accepted
    with pytest.raises(ValueError, match="bounded"):
        Mailbox("unbounded", 0)


def test_send_waits_for_room_backpressure() -> None:
    async def main() -> None:
        box: Mailbox[Ping] = Mailbox("m", 1)
        await box.send(Ping(1))
        sender = asyncio.create_task(box.send(Ping(2)))
        await asyncio.sleep(0)
        assert not sender.done()
        assert box.statistics().blocked_senders == 1
        assert await box.receive() == Ping(1)
        await sender
        stats = box.statistics()
        assert (stats.depth, stats.blocked_senders, stats.received) == (1, 0, 1)

    run_virtual(main())


def test_stop_is_handled_after_queued_messages_and_closes_the_mailbox() -> None:
    async def main() -> None:
        log: list[str] = []
        actor = Recorder("a", log, size=8)
        for i in range(3):
            actor.send_nowait(Ping(i))
        await actor.stop()
        await actor.run()
        assert actor.seen == [0, 1, 2]
        assert log == ["a"]
        stats = actor.statistics()
        assert stats.processed == 3 and not stats.running
        with pytest.raises(MailboxClosed):
            actor.send_nowait(Ping(9))

    run_virtual(main())


def test_cancelling_an_actor_propagates_cancelled_error() -> None:
    async def main() -> None:
        actor = Recorder("a", [], delay_s=10.0)
        actor.send_nowait(Ping(1))
        task = asyncio.create_task(actor.run())
        await asyncio.sleep(1.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
        assert actor.seen == []  # cancelled mid-message: never recorded as handled
        assert not actor.statistics().running

    run_virtual(main())


def _supervised(names: list[str], log: list[str]) -> list[Recorder]:
    return [Recorder(name, log, delay_s=0.5) for name in names]


def test_supervisor_stops_in_written_order_and_leaves_no_task() -> None:
    async def main() -> None:
        log: list[str] = []
        # Given in start order (the reverse of STOP_ORDER) plus one unlisted actor.
        actors = _supervised(["metrics", "learner", "rollout", "extra"], log)
        supervisor = Supervisor(actors)
        assert supervisor.stop_sequence == (*STOP_ORDER, "extra")

        async def driver() -> None:
            for actor in actors:
                await actor.send(Ping(1))
                await actor.send(Ping(2))

        await supervisor.run(driver())
        assert log == [*STOP_ORDER, "extra"]
        assert supervisor.stopped == log
        # Messages sent before the stop were all handled: stopping drains mailboxes.
        assert all(actor.seen == [1, 2] for actor in actors)
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run_virtual(main())


def test_an_actor_failure_cancels_the_others_and_propagates() -> None:
    async def main() -> None:
        log: list[str] = []
        good = Recorder("learner", log, delay_s=100.0)
        bad = Recorder("rollout", log, fail_on=7)
        supervisor = Supervisor([good, bad])

        async def driver() -> None:
            await good.send(Ping(1))
            await bad.send(Ping(7))
            await asyncio.sleep(1000.0)

        with pytest.raises(ExceptionGroup) as caught:
            await supervisor.run(driver())
        assert caught.group_contains(RuntimeError, match="rollout failed on 7")
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert not good.statistics().running and not bad.statistics().running

    run_virtual(main())


def test_a_stuck_actor_is_cancelled_after_the_stop_timeout() -> None:
    async def main() -> None:
        log: list[str] = []
        stuck = Recorder("rollout", log, delay_s=1e6)
        after = Recorder("learner", log)
        supervisor = Supervisor([stuck, after], stop_timeout_s=5.0)

        async def driver() -> None:
            await stuck.send(Ping(1))
            await asyncio.sleep(0.1)

        await supervisor.run(driver())
        assert log == ["learner"]  # the stuck one was cancelled, not stopped; the next still stopped
        assert supervisor.stopped == ["rollout", "learner"]
        assert asyncio.get_running_loop().time() == pytest.approx(5.1)

    run_virtual(main())


def test_supervisor_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError, match="unique"):
        Supervisor([Recorder("a", []), Recorder("a", [])])
