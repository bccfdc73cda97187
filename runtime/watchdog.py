"""A progress watchdog: a run that stops making progress fails loudly instead of hanging.

A training run can stop progressing without any component failing: a staleness gate that never
admits again, an engine that never answers, a learner step that never returns. Every actor is then
waiting, legitimately, on another. ``ProgressWatchdog.run`` reads a progress counter (the learner's
step count) every few seconds and raises ``NoProgressError`` once it has not changed for
``timeout_s``, with a description of the state the caller supplies (what is in flight, what the gate
would admit), so the error says where the run stood. The caller's TaskGroup then tears the run down
through its normal stop path (checkpoint, report).

Reads the event loop's clock, so tests run it on the virtual clock. Standard library only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import NoReturn


class NoProgressError(RuntimeError):
    """The run made no progress for longer than its limit."""

    def __init__(self, message: str, *, idle_s: float, progress: object) -> None:
        super().__init__(message)
        self.idle_s = idle_s
        """Seconds since the progress counter last changed."""
        self.progress = progress
        """The counter's value when the watchdog gave up."""


class ProgressWatchdog:
    """Raises ``NoProgressError`` when ``progress()`` stays the same for ``timeout_s`` seconds."""

    def __init__(
        self,
        timeout_s: float,
        progress: Callable[[], object],
        describe: Callable[[], str] = lambda: "",
        *,
        what: str = "progress",
        poll_s: float | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self._progress = progress
        self._describe = describe
        self._what = what
        self._poll_s = poll_s if poll_s is not None else min(5.0, timeout_s / 4)

    async def run(self) -> NoReturn:
        """Watch until cancelled; raise ``NoProgressError`` on a stall."""
        loop = asyncio.get_running_loop()
        last = self._progress()
        since = loop.time()
        while True:
            await asyncio.sleep(self._poll_s)
            now = loop.time()
            current = self._progress()
            if current != last:
                last, since = current, now
                continue
            idle = now - since
            if idle >= self.timeout_s:
                state = self._describe()
                raise NoProgressError(
                    f"no {self._what} for {idle:.0f} s (limit {self.timeout_s:g} s; still at {last!r})"
                    + (f": {state}" if state else ""),
                    idle_s=idle,
                    progress=last,
                )
