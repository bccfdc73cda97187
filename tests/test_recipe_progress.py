"""The quiet terminal: log lines above a live progress display, short values, warnings once, JSON file."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from envtune.runtime.recipe.progress import (
    MAX_LINE_CHARS,
    RunProgress,
    ShortValues,
    configure_logging,
    console_level,
    round_significant,
)
from rich.console import Console

_DEFAULT_FORMATWARNING = warnings.formatwarning
_CSI = re.compile(r"\x1b\[(\??)(\d*)([A-Za-z])")


def terminal_screen(raw: str, width: int) -> list[str]:
    """What a terminal shows after ``raw``: CR, LF, cursor up (CSI n A), erase line (CSI 2 K), and
    printable text overwriting in place; other escapes (cursor show/hide) are ignored."""
    lines: list[list[str]] = [[]]
    row = col = 0
    i = 0
    while i < len(raw):
        match = _CSI.match(raw, i)
        if match:
            _, number, command = match.groups()
            if command == "A":
                row = max(0, row - int(number or 1))
            elif command == "K":
                lines[row] = []
                col = 0 if number == "2" else col
            i = match.end()
            continue
        char = raw[i]
        i += 1
        if char == "\r":
            col = 0
        elif char == "\n":
            row, col = row + 1, 0
            while len(lines) <= row:
                lines.append([])
        else:
            line = lines[row]
            line.extend(" " * (col - len(line)))
            if col < len(line):
                line[col] = char
            else:
                line.append(char)
            col += 1
            if col >= width:
                row, col = row + 1, 0
                while len(lines) <= row:
                    lines.append([])
    return ["".join(line).rstrip() for line in lines]


@pytest.fixture
def tty() -> Iterator[tuple[Console, io.StringIO]]:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, force_interactive=True, width=120, color_system=None)
    yield console, buffer
    logging.getLogger().handlers.clear()
    logging.captureWarnings(False)
    warnings.formatwarning = _DEFAULT_FORMATWARNING


def test_log_lines_print_above_the_live_bar(tty: tuple[Console, io.StringIO]) -> None:
    console, buffer = tty
    configure_logging("info", console=console, colors=False)
    log = structlog.get_logger("test")
    records = [{"step": s, "stage": 1, "stage_name": "syntax", "train/reward": 0.1 * s} for s in range(1, 6)]
    with RunProgress(5, 4, console=console) as progress:
        assert progress.live
        for record in records:
            log.info("learner_step", step=record["step"], loss=0.123456789)
            logging.getLogger("transformers").warning("a library line %d", record["step"])
            progress.update(record)
            progress._progress.refresh()  # type: ignore[union-attr]  # draw now, as the timer would
    screen = [line for line in terminal_screen(buffer.getvalue(), 120) if line]
    bar_lines = [line for line in screen if "train" in line and "5/5" in line]
    log_lines = [line for line in screen if "learner_step" in line or "a library line" in line]
    assert len(log_lines) == 10
    for line in log_lines:
        assert "train" not in line and "━" not in line  # no log line shares a row with the bar
        assert line.count("learner_step") + line.count("a library line") == 1
    assert [int(m) for line in log_lines if (m := line.split("step=")[-1]) and "learner_step" in line] == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert bar_lines and screen[-1] == bar_lines[-1]  # the bar is last, below every log line
    assert "loss=0.1235" in log_lines[0]  # rounded on the console
    assert "stage 1/4 syntax" in bar_lines[-1] and "reward 0.5" in bar_lines[-1]


def test_the_emulator_catches_a_hand_written_progress_line() -> None:
    """The check above can fail: a '\\r' bar followed by a log line shares the row."""
    raw = "\r[####....] step 1/5" + "2026-12-03 event=learner_step\n"
    assert any("step 1/5" in line and "learner_step" in line for line in terminal_screen(raw, 200))


def test_without_a_terminal_one_line_per_step() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=200)
    with RunProgress(3, 2, console=console) as progress:
        assert not progress.live
        for step in (1, 2, 3):
            progress.update(
                {"step": step, "stage": 2, "stage_name": "easy", "rollout/episodes_per_s": 1.23456}
            )
    lines = buffer.getvalue().splitlines()
    assert lines == [f"step {s}/3 stage 2/2 easy · 1.23 ep/s" for s in (1, 2, 3)]


def test_disabled_progress_prints_nothing() -> None:
    buffer = io.StringIO()
    with RunProgress(3, 2, console=Console(file=buffer, force_terminal=True), enabled=False) as progress:
        progress.update({"step": 1})
    assert buffer.getvalue() == ""


def test_short_values_round_and_truncate() -> None:
    event = ShortValues(max_value_chars=20)(
        None,
        "info",
        {
            "event": "x" * 50,
            "loss": 0.12345678901234,
            "big": 123456.789,
            "tiny": -0.000123456,
            "n": 12345678,
            "flag": True,
            "nested": {"a": 1 / 3, "b": [2 / 3] * 10},
            "text": "y" * 100,
            "nan": float("nan"),
        },
    )
    assert event["event"] == "x" * 50  # the event name is never cut
    assert event["loss"] == 0.1235 and event["big"] == 123500.0 and event["tiny"] == -0.0001235
    assert event["n"] == 12345678 and event["flag"] is True
    assert event["nested"]["a"] == 0.3333 and event["nested"]["b"][:8] == [0.6667] * 8
    assert event["nested"]["b"][8] == "…(+2)"
    assert event["text"] == "y" * 20 + "…(+80 chars)"
    assert event["nan"] != event["nan"]
    assert round_significant(0.0) == 0.0 and round_significant(9.99999) == 10.0


def test_long_lines_are_cut_on_the_console(tty: tuple[Console, io.StringIO]) -> None:
    console, buffer = tty
    configure_logging("info", console=console, colors=False)
    structlog.get_logger("test").info("learner_step", **{f"metric_{i:02d}": 0.5 for i in range(60)})
    (line,) = [line for line in buffer.getvalue().splitlines() if line]
    assert len(line) <= MAX_LINE_CHARS + 1 and line.endswith("…")


def test_levels_and_the_json_log_file(tty: tuple[Console, io.StringIO], tmp_path: Path) -> None:
    console, buffer = tty
    path = tmp_path / "run" / "log.jsonl"
    configure_logging(console_level(quiet=True), path, console=console, colors=False)
    log = structlog.get_logger("test")
    log.info("hidden_on_console", value=1 / 3)
    log.warning("shown_everywhere", value=2 / 3)
    logging.getLogger("peft").info("library info")
    console_text = buffer.getvalue()
    assert "shown_everywhere" in console_text and "hidden_on_console" not in console_text
    records = [json.loads(line) for line in path.read_text().splitlines()]
    by_event = {r["event"]: r for r in records}
    assert by_event["hidden_on_console"]["value"] == 1 / 3  # full precision in the file
    assert by_event["shown_everywhere"]["level"] == "warning"
    assert "timestamp" in by_event["shown_everywhere"]
    assert "library info" in by_event
    # Configuring again replaces the handlers instead of doubling every line.
    configure_logging(console_level(verbose=True), path, console=console, colors=False)
    log.debug("debug_now", x=1)
    assert len([h for h in logging.getLogger().handlers if h.name]) == 2
    assert buffer.getvalue().count("debug_now") == 1
    with pytest.raises(ValueError):
        console_level(verbose=True, quiet=True)


def test_library_warnings_are_shown_once(tty: tuple[Console, io.StringIO]) -> None:
    console, buffer = tty
    with warnings.catch_warnings():
        configure_logging("info", console=console, colors=False)
        for step in range(5):
            warnings.warn("envtune-test: `foo` is deprecated", FutureWarning, stacklevel=1)
            warnings.warn(f"envtune-test: step-specific {step % 2}", UserWarning, stacklevel=1)
        warnings.warn("envtune-test: `foo` is deprecated", DeprecationWarning, stacklevel=1)
    lines = [line for line in buffer.getvalue().splitlines() if line]
    assert len(lines) == 4  # one line per (category, message), each shown once
    assert sum("FutureWarning: envtune-test: `foo` is deprecated" in line for line in lines) == 1
    assert sum("DeprecationWarning: envtune-test: `foo` is deprecated" in line for line in lines) == 1
    assert sum("step-specific 0" in line for line in lines) == 1
    assert sum("step-specific 1" in line for line in lines) == 1
    assert all("[test_recipe_progress.py:" in line for line in lines)


def test_a_librarys_own_filter_cannot_repeat_a_warning(tty: tuple[Console, io.StringIO]) -> None:
    """transformers/torch code may warn under its own ``always`` filter: still one line."""
    console, buffer = tty
    with warnings.catch_warnings():
        configure_logging("info", console=console, colors=False)
        for _ in range(3):
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.warn("envtune-test: said again", FutureWarning, stacklevel=1)
        configure_logging("info", console=console, colors=False)  # configured again: still once
        warnings.warn("envtune-test: said again", FutureWarning, stacklevel=1)
    assert buffer.getvalue().count("envtune-test: said again") == 1


def test_a_librarys_own_handler_is_adopted(
    tty: tuple[Console, io.StringIO], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A library logger with its own stderr handler and no propagation (transformers' set-up) ends up
    in the run's format on the console and in the JSON file."""
    import sys

    from envtune.runtime.recipe.progress import adopt_library_loggers

    console, buffer = tty
    library = logging.getLogger("envtune-test-library")
    library.addHandler(logging.StreamHandler(sys.stderr))
    library.propagate = False
    try:
        configure_logging("info", tmp_path / "log.jsonl", console=console, colors=False)
        adopt_library_loggers()
        library.warning("a library says %s", "hello")
    finally:
        library.handlers.clear()
        library.propagate = True
    assert "a library says hello" not in capsys.readouterr().err  # not through its own handler
    (line,) = [line for line in buffer.getvalue().splitlines() if "a library says hello" in line]
    assert "[warning" in line
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any(r["event"] == "a library says hello" for r in records)


def test_json_console_keeps_values_whole(tty: tuple[Console, io.StringIO]) -> None:
    console, buffer = tty
    configure_logging("info", console=console, colors=False, fmt="json")
    structlog.get_logger("test").info("learner_step", loss=1 / 3, **{f"m{i:02d}": 0.5 for i in range(60)})
    (line,) = [line for line in buffer.getvalue().splitlines() if line]
    event = json.loads(line)
    assert event["loss"] == 1 / 3 and event["m59"] == 0.5 and event["event"] == "learner_step"
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", console=console, fmt="yaml")  # type: ignore[arg-type]
def test_a_library_stderr_handler_prints_each_line_once(tty: tuple[Console, io.StringIO]) -> None:
    """transformers keeps a stderr handler of its own; with its propagation on (anything may turn it
    on), each of its lines used to be printed twice above the bar, once unformatted."""
    console, buffer = tty
    library = logging.getLogger("a_library")
    library.addHandler(logging.StreamHandler(sys.stderr))
    library.propagate = True
    try:
        configure_logging("info", console=console, colors=False)
        with RunProgress(2, 4, console=console) as progress:
            library.warning("one library line")
            progress._progress.refresh()  # type: ignore[union-attr]
        screen = [line for line in terminal_screen(buffer.getvalue(), 120) if "one library line" in line]
        assert len(screen) == 1 and "warning" in screen[0]
        assert library.handlers == []
    finally:
        library.handlers.clear()
