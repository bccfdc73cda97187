"""The supervisor: starts every actor in one TaskGroup and stops them in one written-down order.

Shutdown order (``STOP_ORDER``) follows the data, upstream first, so nothing is lost in between:

1. ``rollout``   stops dispatching; in-flight episodes finish within its grace period or are
   cancelled (counted as dropped/cancelled); finished groups are sent to the trajectory queue.
2. ``learner``   its mailbox *is* the trajectory queue: ``Stop`` lands behind the last group, so the
   queue is drained into the learner before it stops (it publishes and checkpoints on the way out).
3. ``metrics``   records the final state of everything above.

Each actor gets ``Stop`` and is awaited before the next one is asked; one that does not finish
within ``stop_timeout_s`` is cancelled. Actors that are not in ``STOP_ORDER`` (or the order given)
stop after the listed ones, in reverse start order. Any actor failing cancels all the others (the
TaskGroup's rule) and the error propagates out of ``run``: no task outlives the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Sequence
from typing import Any

import structlog
from envtune.runtime.actors import Actor, MailboxClosed

log = structlog.get_logger(__name__)

STOP_ORDER: tuple[str, ...] = ("rollout", "learner", "metrics")
"""Actor names in the order they are stopped (see the module docstring for why)."""


class Supervisor:
    """Owns the actors' tasks: start all in one TaskGroup, stop in order, leave nothing running."""

    def __init__(
        self,
        actors: Sequence[Actor[Any]],
        stop_order: Sequence[str] = STOP_ORDER,
        stop_timeout_s: float = 60.0,
    ) -> None:
        names = [actor.name for actor in actors]
        if len(set(names)) != len(names):
            raise ValueError(f"actor names must be unique, got {names}")
        self._actors = tuple(actors)
        listed = [a for name in stop_order for a in self._actors if a.name == name]
        rest = [a for a in reversed(self._actors) if a not in listed]
        self._stop_sequence: tuple[Actor[Any], ...] = (*listed, *rest)
        self._stop_timeout_s = stop_timeout_s
        self.stopped: list[str] = []
        """Names in the order their tasks ended during an orderly stop (for logs and tests)."""

    @property
    def stop_sequence(self) -> tuple[str, ...]:
        """The order ``run`` will stop the actors in."""
        return tuple(actor.name for actor in self._stop_sequence)

    async def run(self, until: Awaitable[object]) -> None:
        """Run every actor until ``until`` completes (or fails), then stop them in order.

        ``until`` is the driver: e.g. "the learner reached N steps" or a signal handler's event.
        If it raises, the actors are still stopped in order and the error propagates.
        """
        async with asyncio.TaskGroup() as group:
            tasks = {a.name: group.create_task(a.run(), name=f"actor:{a.name}") for a in self._actors}
            log.info("supervisor.started", actors=list(tasks))
            try:
                await until
            finally:
                # Shielding is not needed: if we are cancelled here the TaskGroup cancels every
                # actor task anyway; the orderly path is for normal completion and driver errors.
                await self._stop_all(tasks)

    async def _stop_all(self, tasks: dict[str, asyncio.Task[None]]) -> None:
        for actor in self._stop_sequence:
            task = tasks[actor.name]
            if not task.done():
                await self._stop_one(actor, task)
            self.stopped.append(actor.name)
        log.info("supervisor.stopped", order=self.stopped)

    async def _stop_one(self, actor: Actor[Any], task: asyncio.Task[None]) -> None:
        try:
            async with asyncio.timeout(self._stop_timeout_s):
                with contextlib.suppress(MailboxClosed):  # it is ending on its own: just wait
                    await actor.stop("supervisor")
                await asyncio.wait({task})
        except TimeoutError:
            log.warning("supervisor.stop_timeout", actor=actor.name, timeout_s=self._stop_timeout_s)
            task.cancel()
            await asyncio.wait({task})
