"""A time limit for tool calls that run synchronously on the caller's thread.

BFCL's classes are plain Python called on the episode's thread (in a run, the event loop's). A Python
thread cannot be killed, and moving a call to a worker would share the episode's instances between
threads. So a ``Watchdog`` thread raises ``StepTimeLimitExceeded`` *inside* the calling thread once its
deadline has passed (CPython's ``PyThreadState_SetAsyncExc``). The exception arrives at the next point
where the interpreter checks for pending work, so it stops Python-level loops and recursion, but not
one long C operation (a huge ``int`` power, a ``Decimal`` square root at a million digits): those are
refused before the call starts by the argument bounds of ``limits.py``. The two together bound a step.

Why the exception can only land where it is caught: a window is one entry in a dict, and whoever pops
it first owns it (``dict.pop`` is atomic under the GIL). If the caller's ``disarm`` pops it, the
watchdog never fires for it. If the watchdog pops it, it fires while holding a lock, and ``disarm``
waits on that lock, then clears the exception if it was not delivered yet; so nothing is pending once
``disarm`` has returned, and the hot path (one window per tool call) takes no lock. The caller
(``Dispatcher.dispatch``) arms inside a ``try`` whose outer handler catches the exception, and runs
only the tool call and the rendering of its result in the window.
``StepTimeLimitExceeded`` derives from ``BaseException`` so that a tool's ``except Exception`` cannot
swallow it. A tool that catches ``BaseException`` itself (none of BFCL's classes does) would absorb it;
the step's measured time still reports the overrun.

The watchdog thread is started on the first ``arm``, sleeps at most ``poll_s`` at a time while calls
arrive, and exits after ``idle_exit_s`` without any; nothing needs closing. Left out: interrupting C
code, which is impossible in-process.
"""

from __future__ import annotations

import ctypes
import itertools
import platform
import threading
import time
from dataclasses import dataclass
from threading import get_ident

DEFAULT_POLL_S = 0.25
"""Longest sleep of the watchdog while calls arrive: a deadline is enforced at most this late."""
DEFAULT_IDLE_EXIT_S = 10.0
"""The watchdog thread exits after this long without a call (the next ``arm`` starts a new one)."""


class StepTimeLimitExceeded(BaseException):
    """Raised inside a tool call whose step ran past its time limit (never escapes ``dispatch``)."""


@dataclass(frozen=True, slots=True)
class WatchdogStatistics:
    """A snapshot of a watchdog's counters."""

    armed: int
    """Windows open right now (one per thread at most)."""
    windows: int
    """Windows opened since the watchdog was made."""
    fired: int
    """Windows interrupted at their deadline since the watchdog was made."""
    thread_alive: bool
    """Whether the watchdog thread is running now."""


def _interrupts_supported() -> bool:
    return platform.python_implementation() == "CPython" and hasattr(ctypes, "pythonapi")


Token = int
"""A window's serial number (unique per watchdog)."""

_MISSING = object()


class Watchdog:
    """Interrupts a thread's tool call at its deadline; one per environment, shared by its episodes."""

    __slots__ = ("_armed", "_fired_total", "_idle_exit_s", "_lock", "_poll_s", "_running", "_serials",
                 "_windows", "interrupts")  # fmt: skip

    def __init__(self, *, poll_s: float = DEFAULT_POLL_S, idle_exit_s: float = DEFAULT_IDLE_EXIT_S) -> None:
        if poll_s <= 0 or idle_exit_s <= 0:
            raise ValueError(f"poll_s and idle_exit_s must be > 0, got {poll_s} and {idle_exit_s}")
        self._poll_s = poll_s
        self._idle_exit_s = idle_exit_s
        self._lock = threading.Lock()
        """Held by the watchdog while it takes a window and fires; a caller whose window was taken
        waits on it before clearing what was not delivered."""
        self._armed: dict[Token, tuple[int, float]] = {}  # serial -> (thread id, deadline)
        self._serials = itertools.count(1)
        self._windows = 0
        self._fired_total = 0
        self._running = False
        self.interrupts = _interrupts_supported()
        """False where the interpreter cannot raise in another thread: deadlines are then only measured."""

    def arm(self, deadline: float) -> Token:
        """Open a window for the calling thread until ``deadline`` (``time.monotonic``); returns its token.

        Lock-free: registering is one dict store, atomic under the GIL (this runs once per tool call).
        """
        if not self._running:
            self._start()  # before registering: nothing can be delivered to this thread meanwhile
        token = next(self._serials)
        self._armed[token] = (get_ident(), deadline)
        self._windows = token
        if not self._running:  # the watchdog exited between the check and the store (rare)
            self._start()
        return token

    def disarm(self, token: Token) -> bool:
        """Close the window ``token``; True when it had fired (an undelivered exception is cleared).

        Whoever pops the token first owns it (``dict.pop`` is atomic): this caller, and the window
        simply closes; or the watchdog, which fires while holding the lock, so the caller waits for it
        and clears the exception if it was not delivered yet.
        """
        if self._armed.pop(token, _MISSING) is not _MISSING:
            return False
        with self._lock:  # disarm runs on the thread that armed the window
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(get_ident()), None)  # NULL: clear
        return True

    def statistics(self) -> WatchdogStatistics:
        with self._lock:
            return WatchdogStatistics(
                armed=len(self._armed),
                windows=self._windows,
                fired=self._fired_total,
                thread_alive=self._running,
            )

    def _start(self) -> None:
        with self._lock:
            if self._running or not self.interrupts:
                return
            self._running = True
            threading.Thread(target=self._run, name="envtune-tool-watchdog", daemon=True).start()

    def _run(self) -> None:
        idle_since = time.monotonic()
        seen_windows = -1
        while True:
            with self._lock:
                now = time.monotonic()
                wake = now + self._poll_s
                if self._armed or self._windows != seen_windows:
                    idle_since = now
                    seen_windows = self._windows
                elif now - idle_since >= self._idle_exit_s:
                    self._running = False  # an arm racing with this re-checks after registering
                    return
                for token, (ident, deadline) in list(self._armed.items()):
                    if deadline > now:
                        wake = min(wake, deadline)
                    elif self._armed.pop(token, _MISSING) is not _MISSING:  # else its caller closed it
                        self._fired_total += 1
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(
                            ctypes.c_ulong(ident), ctypes.py_object(StepTimeLimitExceeded)
                        )
            time.sleep(max(0.0, wake - time.monotonic()))
