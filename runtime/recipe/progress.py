"""A quiet, informative terminal: one live progress display, short log lines above it, JSON logs in a file.

A long run used to print 17-digit floats, 900-character lines, a library warning every step, and a
hand-written ``\\r`` progress line that every log line broke. Here:

- ``configure_logging(console_level, json_log_path)`` routes structlog *and* the standard library's
  logging (transformers, peft, ``warnings``) through two handlers: the console, where
  ``ShortValues`` rounds floats to 4 significant digits and cuts long values (the whole line is
  bounded too), and, optionally, a JSON-lines file in the run folder with every value in full.
  Console output goes through a rich ``Console``, so while a ``RunProgress`` is live each log line is
  printed *above* the progress display instead of inside it.
- Python warnings are captured into the log and shown once per (category, message): a deprecation
  warning raised every step appears once.
- ``--verbose``/``--quiet`` map to the console level (debug / warning); the file keeps info and up
  (debug with ``--verbose``). ``logging.format = "json"`` renders the console as JSON lines too
  (values whole), for log collectors.
- ``RunProgress`` is the progress display: a bar with step/total, stage, reward, episodes/s, elapsed
  and remaining time, redrawn in place on a terminal; without a terminal (CI, a pipe) one short line
  per step instead.

Left out: what the metrics are (the learner's records), colours beyond rich's defaults.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import structlog
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

ConsoleLevel = Literal["debug", "info", "warning", "error"]

SIGNIFICANT_DIGITS = 4
"""Floats on the console keep this many significant digits (the JSON log keeps all)."""
MAX_VALUE_CHARS = 80
"""A console value longer than this is cut, with the number of characters left out."""
MAX_LINE_CHARS = 240
"""A console line longer than this is cut (a learner step's whole record belongs in metrics, not logs)."""
_HANDLER_NAME = "envtune-console"
_FILE_HANDLER_NAME = "envtune-json-file"


def console_level(*, verbose: bool = False, quiet: bool = False) -> ConsoleLevel:
    """The console level for ``--verbose``/``--quiet`` (both at once is an error)."""
    if verbose and quiet:
        raise ValueError("--verbose and --quiet exclude each other")
    return "debug" if verbose else "warning" if quiet else "info"


def add_verbosity_arguments(parser: argparse.ArgumentParser) -> None:
    """``-v/--verbose`` and ``-q/--quiet`` (mutually exclusive) on an entry point's parser."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="debug messages on the terminal")
    group.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on the terminal")


# --- processors ----------------------------------------------------------------------------------------


def round_significant(value: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """``value`` rounded to ``digits`` significant digits (non-finite values unchanged)."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def _shorten(value: Any, max_chars: int, depth: int = 0) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return round_significant(value)
    if isinstance(value, Mapping) and depth < 2:
        return {k: _shorten(v, max_chars, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple) and depth < 2:
        items = [_shorten(v, max_chars, depth + 1) for v in value[:8]]
        return [*items, f"…(+{len(value) - 8})"] if len(value) > 8 else items
    text = value if isinstance(value, str) else repr(value)
    if len(text) > max_chars:
        return f"{text[:max_chars]}…(+{len(text) - max_chars} chars)"
    return value


class ShortValues:
    """structlog processor for the console: floats to 4 significant digits, long values cut.

    The event name, the level and the exception text are left whole (an error must stay readable).
    """

    def __init__(self, max_value_chars: int = MAX_VALUE_CHARS) -> None:
        self.max_value_chars = max_value_chars

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in list(event_dict.items()):
            if key in ("event", "level", "exception", "exc_info", "timestamp", "_record", "_from_structlog"):
                continue
            event_dict[key] = _shorten(value, self.max_value_chars)
        return event_dict


def _short_time(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """ISO timestamps (kept in the file) as ``HH:MM:SS`` on the console."""
    stamp = event_dict.get("timestamp")
    if isinstance(stamp, str) and "T" in stamp:
        event_dict["timestamp"] = stamp.split("T", 1)[1][:8]
    return event_dict


class _ConsoleHandler(logging.Handler):
    """Writes formatted records through a rich Console: above a live progress display when one runs."""

    def __init__(self, console: Console, max_line_chars: int | None) -> None:
        super().__init__()
        self.console = console
        self.max_line_chars = max_line_chars

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            first, newline, rest = text.partition("\n")  # a traceback's lines are kept whole
            if self.max_line_chars is not None and len(first) > self.max_line_chars:
                first = f"{first[: self.max_line_chars]}…"
            self.console.print(Text(first + newline + rest), soft_wrap=True, highlight=False)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


# --- configuration -------------------------------------------------------------------------------------


def configure_logging(
    level: ConsoleLevel | str = "info",
    json_log_path: Path | None = None,
    *,
    console: Console | None = None,
    colors: bool | None = None,
    fmt: Literal["console", "json"] = "console",
) -> Console:
    """Configure structlog and stdlib logging for the whole process; returns the console logs go to.

    Safe to call again (for instance once the run folder, and so ``json_log_path``, is known):
    handlers are replaced, not added. ``console`` defaults to rich's stderr console; pass the same one
    to ``RunProgress``. ``fmt="json"`` writes JSON lines (values whole, lines never cut) to the console.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    if fmt not in ("console", "json"):
        raise ValueError(f"log format must be 'console' or 'json', got {fmt!r}")
    console = console or Console(stderr=True)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    console_handler = _ConsoleHandler(console, MAX_LINE_CHARS if fmt == "console" else None)
    console_handler.name = _HANDLER_NAME
    console_handler.setLevel(numeric)
    console_processors: list[Any] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        _short_time,
        ShortValues(),
        structlog.dev.ConsoleRenderer(
            colors=console.is_terminal if colors is None else colors,
            pad_event_to=24,
            exception_formatter=structlog.dev.plain_traceback,
        ),
    ]
    if fmt == "json":
        console_processors = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(),
        ]
    console_handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=console_processors)
    )
    handlers: list[logging.Handler] = [console_handler]
    file_level = min(numeric, logging.INFO)
    if json_log_path is not None:
        Path(json_log_path).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(json_log_path, encoding="utf-8")
        file_handler.name = _FILE_HANDLER_NAME
        file_handler.setLevel(file_level)
        file_handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=shared,
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.dict_tracebacks,
                    structlog.processors.JSONRenderer(),
                ],
            )
        )
        handlers.append(file_handler)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.name in (_HANDLER_NAME, _FILE_HANDLER_NAME):
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        root.addHandler(handler)
    adopt_library_loggers()
    lowest = min(h.level for h in handlers)
    root.setLevel(lowest)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(lowest),
        cache_logger_on_first_use=False,
    )
    show_warnings_once()
    return console


def _one_line_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    # The default format adds the source line on a second line: noise in a log.
    return f"{category.__name__}: {message} [{Path(filename).name}:{lineno}]"


def show_warnings_once() -> None:
    """Capture Python warnings into the log (one line each), each (category, message) once per process.

    ``simplefilter("once")`` alone is not enough: a library that installs its own filter ("default",
    "always", inside ``catch_warnings``) takes precedence, so the repeats are dropped here as well, in
    the ``showwarning`` hook every shown warning passes through.
    """
    logging.captureWarnings(True)  # warnings.showwarning now logs to "py.warnings"
    warnings.formatwarning = _one_line_warning
    warnings.simplefilter("once")
    log_warning = warnings.showwarning
    if getattr(log_warning, "_envtune_once", False):
        return  # already installed (configure_logging is called again once the run folder exists)
    seen: set[tuple[type[Warning], str]] = set()

    def show_once(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        key = (category, str(message))
        if key not in seen:
            seen.add(key)
            log_warning(message, category, filename, lineno, file, line)

    show_once._envtune_once = True  # type: ignore[attr-defined]
    warnings.showwarning = show_once


def adopt_library_loggers() -> None:
    """Route libraries' own stderr handlers (transformers installs one) through the configured
    handlers instead: the same short console format, and into ``log.jsonl``; each line once, also when
    something turned the library's propagation on (then it printed twice, once unformatted). Called
    by ``configure_logging``, and again once the libraries are imported (a handler added later would
    keep its own format)."""
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger):
            continue
        streams = (sys.stderr, sys.__stderr__)
        own = [h for h in logger.handlers if type(h) is logging.StreamHandler and h.stream in streams]
        for handler in own:
            logger.removeHandler(handler)
        if own:
            logger.propagate = True


# --- the progress display ------------------------------------------------------------------------------


class RunProgress:
    """The run's progress display; use as a context manager and call ``update(record)`` per step.

    On a terminal: a rich progress bar redrawn in place; log lines (and anything written to
    stdout/stderr meanwhile) appear above it. Elsewhere: one short line per step.
    """

    def __init__(
        self,
        total_steps: int,
        num_stages: int,
        *,
        console: Console | None = None,
        enabled: bool = True,
        start_step: int = 0,
        label: str = "train",
        unit: str = "step",
    ) -> None:
        self.total_steps = total_steps
        self.num_stages = num_stages
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.start_step = start_step
        self.label = label
        """The bar's title (``train``; ``envtune-eval`` shows the suite)."""
        self.unit = unit
        """What is counted, in the line printed per update without a terminal."""
        self._progress: Progress | None = None
        self._task: Any = None
        self._redirected: list[tuple[logging.StreamHandler[Any], Any]] = []

    @property
    def live(self) -> bool:
        """Whether the display redraws in place (a terminal) rather than printing lines."""
        return self.enabled and self.console.is_terminal

    def __enter__(self) -> RunProgress:
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
                redirect_stdout=True,
                redirect_stderr=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                self.label, total=self.total_steps or None, completed=self.start_step, status="starting"
            )
            self._redirect_stream_handlers()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _redirect_stream_handlers(self) -> None:
        """Libraries' own stderr handlers (transformers has one) hold the real stderr; while the display
        is live they write through rich's proxy instead, so their lines land above it too."""
        proxy = sys.stderr  # rich's FileProxy, installed by Progress.start()
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            for handler in getattr(logger, "handlers", ()):
                if type(handler) is logging.StreamHandler and handler.stream in (
                    sys.__stderr__,
                    self._real_stderr(),
                ):
                    self._redirected.append((handler, handler.setStream(proxy)))

    def _real_stderr(self) -> Any:
        file = getattr(sys.stderr, "rich_proxied_file", None)
        return file if file is not None else sys.__stderr__

    def update(self, record: Mapping[str, Any]) -> None:
        """Show a learner step's record (``step``, ``stage``, ``stage_name`` and rates if present)."""
        if not self.enabled:
            return
        self.advance(int(record["step"]), self.status_text(record))

    def advance(self, completed: int, status: str) -> None:
        """Show ``completed`` of the total with a status text (what ``update`` does for a step record)."""
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, status=status)
        else:
            of = f"/{self.total_steps}" if self.total_steps else ""
            prefix = f"{self.label} " if self.label != "train" else ""
            line = f"{prefix}{self.unit} {completed}{of} {status}".rstrip()
            self.console.print(Text(line), soft_wrap=True, highlight=False)

    def status_text(self, record: Mapping[str, Any]) -> str:
        """``stage 2/4 syntax · reward 0.4123 · 1.53 ep/s`` from a record (missing parts left out)."""
        parts = []
        if "stage" in record:
            parts.append(f"stage {record['stage']}/{self.num_stages} {record.get('stage_name', '')}".rstrip())
        reward = record.get("train/reward", record.get("learner/reward_mean"))
        if isinstance(reward, int | float):
            parts.append(f"reward {round_significant(float(reward)):g}")
        rate = record.get("rollout/episodes_per_s")
        if isinstance(rate, int | float):
            parts.append(f"{round_significant(float(rate), 3):g} ep/s")
        validation = [k for k in record if k.startswith("validation/") and k.endswith("accuracy")]
        if validation:
            parts.append(f"val {round_significant(float(record[validation[0]])):g}")
        return " · ".join(parts)

    def close(self) -> None:
        """Stop the display (the last state stays on screen) and give libraries their stderr back."""
        for handler, previous in reversed(self._redirected):
            handler.setStream(previous)
        self._redirected.clear()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
