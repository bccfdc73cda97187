"""Actors: state owned by one task, driven only through a bounded mailbox of typed messages.

An ``Actor`` owns a ``Mailbox`` (a bounded ``asyncio.Queue``) and a ``run()`` loop that takes one
message at a time and hands it to ``handle()``; subclasses dispatch on the message's type with
``match``. Nobody touches an actor's state from outside: they ``send()`` a frozen message.

Backpressure is the point of the bound: ``send()`` waits while the mailbox is full and
``send_nowait()`` raises ``MailboxFull`` instead (trio's ``x`` / ``x_nowait`` pair). A ``Stop``
message is queued behind everything sent before it, so stopping an actor drains its mailbox first;
cancelling its task stops it at once. ``CancelledError`` is always re-raised, never swallowed.

Left out on purpose: starting, ordering and stopping several actors (``supervisor.py``), and any
thread or process work (actors that run torch hand it to ``asyncio.to_thread`` themselves).
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger(__name__)

M = TypeVar("M")


@dataclass(frozen=True, slots=True)
class Stop:
    """Asks an actor to finish: handled after every message queued before it."""

    reason: str = "stop"
    """Why the actor is being stopped (logged)."""


class MailboxFull(RuntimeError):
    """``send_nowait`` found the mailbox at its bound."""


class MailboxClosed(RuntimeError):
    """A message was sent to an actor that has already stopped (it would never be handled)."""


@dataclass(frozen=True, slots=True)
class MailboxStatistics:
    """A snapshot of one mailbox."""

    name: str
    """Owner's name."""
    depth: int
    """Messages waiting now."""
    capacity: int
    """The bound (``maxsize``)."""
    peak_depth: int
    """Largest depth seen since creation."""
    sent: int
    """Messages accepted so far."""
    received: int
    """Messages taken out so far."""
    blocked_senders: int
    """``send()`` calls waiting for room now (backpressure in effect when > 0)."""


class Mailbox(Generic[M]):
    """A bounded FIFO of messages with introspection; one consumer (its actor), many senders."""

    def __init__(self, name: str, maxsize: int, accepts: tuple[type, ...] = ()) -> None:
        if maxsize < 1:
            raise ValueError(f"mailbox {name!r}: maxsize must be >= 1 (bounded), got {maxsize}")
        self.name = name
        self._queue: asyncio.Queue[M | Stop] = asyncio.Queue(maxsize)
        # ``Stop`` is always accepted; an empty tuple means "any type" (tests, generic pipes).
        self._accepts = (*accepts, Stop) if accepts else ()
        self._peak = 0
        self._sent = 0
        self._received = 0
        self._blocked = 0
        self._closed = False

    def _check(self, message: object) -> None:
        if self._closed:
            raise MailboxClosed(f"mailbox {self.name!r} is closed; {type(message).__name__} not delivered")
        if self._accepts and not isinstance(message, self._accepts):
            names = ", ".join(t.__name__ for t in self._accepts)
            raise TypeError(f"mailbox {self.name!r} accepts {names}; got {type(message).__name__}")

    def _accepted(self) -> None:
        self._sent += 1
        self._peak = max(self._peak, self._queue.qsize())

    async def send(self, message: M | Stop) -> None:
        """Queue ``message``, waiting while the mailbox is full (backpressure)."""
        self._check(message)
        if self._queue.full():
            self._blocked += 1
            try:
                await self._queue.put(message)
            finally:
                self._blocked -= 1
        else:
            self._queue.put_nowait(message)
        self._accepted()

    def send_nowait(self, message: M | Stop) -> None:
        """Queue ``message`` or raise ``MailboxFull``."""
        self._check(message)
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            raise MailboxFull(f"mailbox {self.name!r} is full ({self._queue.maxsize})") from None
        self._accepted()

    async def receive(self) -> M | Stop:
        """The oldest message, waiting for one if the mailbox is empty."""
        message = await self._queue.get()
        self._received += 1
        return message

    def close(self) -> None:
        """Refuse further messages (the consumer is gone); what is queued stays readable."""
        self._closed = True

    def statistics(self) -> MailboxStatistics:
        return MailboxStatistics(
            name=self.name,
            depth=self._queue.qsize(),
            capacity=self._queue.maxsize,
            peak_depth=self._peak,
            sent=self._sent,
            received=self._received,
            blocked_senders=self._blocked,
        )


@dataclass(frozen=True, slots=True)
class ActorStatistics:
    """A snapshot of one actor."""

    name: str
    """The actor's name (the supervisor keys stop order by it)."""
    mailbox: MailboxStatistics
    """Its mailbox."""
    processed: int
    """Messages handled to completion (``Stop`` excluded)."""
    running: bool
    """True between the start of ``run()`` and its end."""


class Actor(abc.ABC, Generic[M]):
    """Base actor: one mailbox, one ``run()`` loop, ``handle()`` per message.

    Subclasses list the message types they accept (``accepts``), implement ``handle`` with a
    ``match`` on the message type, and may override ``on_start`` / ``on_stop``. An exception from
    ``handle`` ends the actor (and, under a supervisor, the whole TaskGroup): a bad *rollout* is
    data, but a bad *message* is a bug.
    """

    accepts: tuple[type, ...] = ()
    """Message types this actor handles (besides ``Stop``); empty accepts any type."""

    def __init__(self, name: str, mailbox_size: int) -> None:
        self.name = name
        self.mailbox: Mailbox[M] = Mailbox(name, mailbox_size, self.accepts)
        self._processed = 0
        self._running = False

    async def send(self, message: M | Stop) -> None:
        """Deliver ``message`` to this actor, waiting while its mailbox is full."""
        await self.mailbox.send(message)

    def send_nowait(self, message: M | Stop) -> None:
        """Deliver ``message`` or raise ``MailboxFull``."""
        self.mailbox.send_nowait(message)

    async def stop(self, reason: str = "stop") -> None:
        """Queue a ``Stop`` behind what is already queued (the caller awaits the actor's task)."""
        await self.mailbox.send(Stop(reason))

    async def on_start(self) -> None:
        """Called once before the first message."""

    async def on_stop(self, reason: str) -> None:
        """Called once when ``Stop`` is handled (not on cancellation)."""

    @abc.abstractmethod
    async def handle(self, message: M) -> None:
        """Handle one message (dispatch on its type)."""

    async def run(self) -> None:
        """Take messages until ``Stop``; the mailbox is closed on the way out, however it ends."""
        self._running = True
        try:
            await self.on_start()
            while True:
                message = await self.mailbox.receive()
                if isinstance(message, Stop):
                    log.debug("actor.stopping", actor=self.name, reason=message.reason)
                    await self.on_stop(message.reason)
                    return
                await self.handle(message)
                self._processed += 1
        finally:
            self.mailbox.close()
            self._running = False

    def statistics(self) -> ActorStatistics:
        return ActorStatistics(
            name=self.name,
            mailbox=self.mailbox.statistics(),
            processed=self._processed,
            running=self._running,
        )
