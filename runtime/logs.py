"""structlog configured plainly, for library use (a notebook, a script driving ``train``).

Logs are events (JSON lines or a console renderer); metrics are written apart from logs, by the
run folder. Configuration is explicit and idempotent. The entry points use the fuller terminal of
``runtime/recipe/progress.py`` instead (short lines above a progress display, a JSON log file,
library warnings once), which needs rich and so stays out of the core.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Literal

import structlog

LogFormat = Literal["json", "console"]


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    # Resolve sys.stderr when a logger is made, not when logging is configured: whoever swaps stderr
    # later (a test runner's capture, a daemon) must not leave structlog writing to a closed file.
    return structlog.PrintLogger(file=sys.stderr)


def configure_logging(fmt: LogFormat = "console", level: str = "info") -> None:
    """Configure structlog for the whole process (safe to call more than once)."""
    if fmt not in ("json", "console"):
        raise ValueError(f"log format must be 'json' or 'console', got {fmt!r}")
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level!r}")
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        # Plain tracebacks: rich's, with every frame's locals, turn one failure into kilobytes of log.
        else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


class LogThrottle:
    """At most one log line per key per ``interval_s``; the lines held back are counted.

    A failure that hits every request at once (an engine outage under 1,000 concurrent episodes)
    must read as a few lines saying how many, not as thousands of identical warnings.
    """

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None when this line is held back; else how many lines of ``key`` were held back before it."""
        now = self._clock()
        if now < self._next.get(key, float("-inf")):
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._next[key] = now + self.interval_s
        return self._held.pop(key, 0)
