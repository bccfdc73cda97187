"""Run ``envtune-run`` and SIGKILL it at a chosen point: the process faults of ``benchmarks/faults.py``.

    python benchmarks/_crash_points.py POINT N -- [envtune-run arguments]

kills the process (``os.kill(os.getpid(), SIGKILL)``: no cleanup, no ``finally``, exactly a power
cut or the OOM killer) the ``N``-th time (1-based) it reaches ``POINT``:

- ``rollout``: an episode starts;
- ``learner_step``: inside a learner step, after its forward passes, before the weights change;
- ``adapter_publish``: the engine has loaded the new adapter, the publisher has not recorded it;
- ``metrics_append``: half of a metrics record is on disk (a torn last line);
- ``checkpoint_write``: the checkpoint's files are written into its temp folder, no ``COMPLETE`` yet;
- ``checkpoint_rename``: ``COMPLETE`` is written and fsync'ed, the folder not yet renamed into place;
- ``report``: the report is half written (after its first plot).

The patches wrap envtune's own functions; nothing of envtune knows about them. This is test
machinery (it lives with the benchmarks, which may import every layer), never a production path.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

POINTS = (
    "rollout",
    "learner_step",
    "adapter_publish",
    "metrics_append",
    "checkpoint_write",
    "checkpoint_rename",
    "report",
)


def _die() -> None:
    sys.stderr.write("crash_points: SIGKILL\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class _Counter:
    def __init__(self, at: int) -> None:
        self.at = at
        self.hits = 0

    def hit(self) -> bool:
        self.hits += 1
        return self.hits == self.at


def _wrap(
    owner: Any, name: str, before: Callable[..., None] | None = None, after: Callable[..., None] | None = None
) -> None:
    original = getattr(owner, name)

    if callable(original) and _is_coroutine(original):

        @functools.wraps(original)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                before(*args, **kwargs)
            result = await original(*args, **kwargs)
            if after is not None:
                after(*args, **kwargs)
            return result

        setattr(owner, name, async_wrapper)
        return

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            before(*args, **kwargs)
        result = original(*args, **kwargs)
        if after is not None:
            after(*args, **kwargs)
        return result

    setattr(owner, name, wrapper)


def _is_coroutine(fn: Any) -> bool:
    import inspect

    return inspect.iscoroutinefunction(fn)


def install(point: str, at: int) -> None:
    """Patch envtune so the process kills itself at the ``at``-th hit of ``point``."""
    counter = _Counter(at)

    def maybe_die(*_args: Any, **_kwargs: Any) -> None:
        if counter.hit():
            _die()

    if point == "rollout":
        from envtune.runtime.recipe.episodes import CurriculumEpisodes

        _wrap(CurriculumEpisodes, "__call__", before=maybe_die)
    elif point == "learner_step":
        from envtune.optim.learner import Learner

        _wrap(Learner, "_update", before=maybe_die)
    elif point == "adapter_publish":
        from envtune.runtime.engines.sglang_client import SGLangClient

        _wrap(SGLangClient, "load_adapter", after=maybe_die)
    elif point == "metrics_append":
        from envtune.runtime.recipe import sinks

        original = sinks.JsonlSink.write_record

        def torn_write(self: Any, record: Any) -> None:
            if self.path.name == "metrics.jsonl" and "event" not in record and counter.hit():
                import json

                line = json.dumps(record, default=str)
                self._handle.write(line[: len(line) // 2])
                self._handle.flush()
                os.fsync(self._handle.fileno())
                _die()
            original(self, record)

        sinks.JsonlSink.write_record = torn_write  # type: ignore[method-assign]
    elif point == "checkpoint_write":
        from envtune.runtime.recipe import run_folder

        original_save = run_folder.RunFolder.save_checkpoint

        def save(self: Any, step: int, state: Any, write: Any = None) -> Path:
            def write_then_maybe_die(folder: Path) -> None:
                if write is not None:
                    write(folder)
                maybe_die()

            return original_save(self, step, state, write_then_maybe_die)

        run_folder.RunFolder.save_checkpoint = save  # type: ignore[method-assign]
    elif point == "checkpoint_rename":
        from envtune.runtime.recipe import run_folder

        real_replace = os.replace

        def replace(src: Any, dst: Any) -> None:
            if Path(src).name.startswith(".step-") and counter.hit():
                _die()
            real_replace(src, dst)

        run_folder.os.replace = replace  # type: ignore[attr-defined]
    elif point == "report":
        from envtune.runtime.recipe import report

        _wrap(report, "_plot", after=maybe_die)
    else:
        raise SystemExit(f"unknown point {point!r}; one of {', '.join(POINTS)}")


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[2] != "--":
        raise SystemExit(__doc__)
    install(argv[0], int(argv[1]))
    from envtune.runtime.cli.run import main as run_main

    run_main(argv[3:])


if __name__ == "__main__":
    main(sys.argv[1:])
