"""``envtune-run``: one training run of the curriculum, from a config to a run folder with a report.

    envtune-run                                   # the CPU preset: tiny model, every stage briefly
    envtune-run my.toml --set rollout.group_size=8
    envtune-run --model /models/Qwen2.5-7B-Instruct --sglang http://h1:30000,http://h2:30000
    envtune-run --model /models/Qwen2.5-7B-Instruct --launch-sglang
    envtune-run --resume [RUN_DIR]                # the last complete checkpoint of a run
    torchrun --standalone --nproc-per-node 4 -m envtune.runtime.cli.run --model ... --launch-sglang

Under ``torchrun`` the learner is sharded over the ranks (``ranks.py``); rank 0 runs what follows.

Which config: a TOML file is laid over a preset: the paper preset (the dataclass defaults) unless
``--preset cpu`` names the CPU one. Without a TOML file: the paper preset when a real model is named
(``--model``/``--sglang``/``--launch-sglang``), else the CPU preset. ``--set`` overrides go last.

What it does: resolve the config, check the learner's memory estimate for the model (a run that
cannot fit is refused before anything loads), create (or reopen) the run folder, open the engine
stack (``engine_stack.py``; launched workers are watched: one that dies stops the run in order),
run ``recipe.training.train`` under signal handlers, write the report.

Stopping: Ctrl-C (SIGINT) or SIGTERM ends the run cleanly: no new work, in-flight episodes are
cancelled, a checkpoint of the last completed step is written, the report is produced, and the
process exits 130 (SIGINT) or 143 (SIGTERM); a second signal aborts at once, without a checkpoint
(the last complete one is kept). A run that cannot go on (the engine is gone, a launched worker
died, the disk is full, the output folder is read-only) ends with one line saying what to do, the
report, and exit code 1; a run with no learner step for ``run.no_progress_timeout_s`` ends with a
checkpoint, the report, the reason, and exit code 3; bad arguments exit 2. The run folder's path is
the last line written to stdout; logs and the progress display go to stderr (short lines, rounded
numbers; ``-v``/``-q`` for more or less), every log event in full to ``log.jsonl`` in the run
folder, metrics to ``metrics.jsonl`` and the configured sinks (TensorBoard by default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from envtune.optim.memory import MemoryBudgetError
from envtune.runtime.cli.engine_stack import resolve_model_path
from envtune.runtime.cli.exits import (
    EXIT_FAILED,
    EXIT_USAGE,
    SIGINT_EXIT,
    describe_failure,
    describe_os_error,
    signal_exit_code,
)
from envtune.runtime.recipe import config_io
from envtune.runtime.recipe.config import (
    CPU_PRESET,
    PAPER_PRESET,
    Config,
    ConfigError,
    dump_config,
    load_config,
)
from envtune.runtime.recipe.learner_setup import check_memory, check_resume, under_torchrun
from envtune.runtime.recipe.progress import (
    RunProgress,
    add_verbosity_arguments,
    adopt_library_loggers,
    configure_logging,
    console_level,
)
from envtune.runtime.recipe.run_folder import Checkpoint, RunFolder, RunFolderError
from envtune.runtime.recipe.sinks import MetricSinks, SinkUnavailable, open_run_sinks

if TYPE_CHECKING:
    from envtune.optim.learner import PolicyLearner
    from rich.console import Console

log = structlog.get_logger(__name__)

EXIT_NO_PROGRESS = 3
"""Exit status of a run that stopped progressing (``run.no_progress_timeout_s``)."""
LOG_FILE = "log.jsonl"
"""Every log event of the run, values in full, one JSON object per line (``logging.json_log``)."""


# --- the command ----------------------------------------------------------------------------------------


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="envtune-run",
        description="Train a tool-use agent with the Environment Tuning curriculum on BFCL V3 multi-turn. "
        "With no arguments: the CPU preset (a tiny local model, every stage for a few steps).",
        epilog="The run folder's path is printed as the last line of stdout. Ctrl-C stops cleanly with a "
        "checkpoint; --resume continues from it.",
    )
    parser.add_argument(
        "config",
        nargs="?",
        help="TOML config, laid over the --preset (default: the CPU preset; with --model, the paper preset)",
    )
    parser.add_argument(
        "--preset",
        choices=["paper", "cpu"],
        help="the preset a TOML file is laid over (default: paper) or, alone, the config to run",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set rollout.group_size=8 "
        "or --set curriculum.stages.*.promotion.max_steps=2 (see --list-keys)",
    )
    parser.add_argument("--model", help="policy model folder (a Hugging Face causal LM)")
    parser.add_argument(
        "--sglang", help="comma-separated URLs of SGLang servers serving --model (LoRA enabled)"
    )
    parser.add_argument(
        "--launch-sglang",
        action="store_true",
        help="start SGLang workers here, one per GPU group of engine.launch.gpus, from SGLang's own "
        "environment (engine.launch.python, `make sglang-env`)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="RUN_DIR",
        help="continue a run (default: the latest)",
    )
    parser.add_argument("--out", help="parent folder of run folders (run.out_dir)")
    parser.add_argument("--log-format", choices=["console", "json"], help="log renderer on stderr")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as TOML and exit"
    )
    parser.add_argument(
        "--list-keys", action="store_true", help="list every config key with its type and meaning"
    )
    add_verbosity_arguments(parser)
    return parser


def resolve_config(args: argparse.Namespace) -> tuple[Config, RunFolder | None, Checkpoint | None]:
    """The config, and for ``--resume`` the run folder and its checkpoint."""
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.path={args.model}")
    if args.sglang:
        overrides += ["engine.kind=sglang", f"engine.sglang.urls={args.sglang}"]
    if args.launch_sglang:
        if args.sglang:
            raise ConfigError("--sglang and --launch-sglang exclude each other")
        overrides.append("engine.kind=launch")
    if args.out:
        overrides.append(f"run.out_dir={args.out}")
    if args.log_format:
        overrides.append(f"logging.format={args.log_format}")
    if args.resume is not None:
        if args.config or args.preset:
            raise ConfigError("--resume uses the run's own config.toml; pass changes with --set")
        out_dir = Path(args.out or load_config(CPU_PRESET).run.out_dir)
        path = Path(args.resume) if args.resume else RunFolder.latest_run(out_dir)
        if path is None:
            raise RunFolderError(f"--resume: no run with a complete checkpoint under {out_dir}")
        folder = RunFolder.open(path)
        checkpoint = folder.latest_complete_checkpoint()
        if checkpoint is None:
            raise RunFolderError(f"--resume: {path} has no complete checkpoint")
        return load_config(folder.config_path, overrides), folder, checkpoint
    if args.preset:
        preset = CPU_PRESET if args.preset == "cpu" else PAPER_PRESET
    elif args.config or args.model or args.sglang or args.launch_sglang:
        preset = PAPER_PRESET
    else:
        preset = CPU_PRESET
    layers = [preset, Path(args.config)] if args.config else [preset]
    for path in layers:
        config_io.read_toml(path)  # a clear error for a missing or broken file before anything else
    return config_io.load_layers(Config, layers, overrides), None, None


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``envtune-run`` (exits non-zero on failure or a signal; see the module docstring)."""
    try:
        code = _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the run's own handlers are installed (imports, setup)
        sys.stderr.write("envtune-run: interrupted\n")
        code = SIGINT_EXIT
    if code:
        sys.exit(code)


def _fail(message: str) -> int:
    sys.stderr.write(f"envtune-run: error: {message}\n")
    sys.stderr.flush()
    return EXIT_FAILED


def _main(argv: Sequence[str] | None) -> int:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if args.list_keys:
        for key, type_name, doc in config_io.describe_keys(Config):
            print(f"{key}  ({type_name})\n    {' '.join(doc.split())}")
        return 0
    if under_torchrun() and not args.print_config:
        from envtune.runtime.cli.ranks import main_ranks

        # The learner on every rank, the run on rank 0 (its exit code).
        return main_ranks(args, parser, resolve_config, run_training)
    try:
        config, folder, checkpoint = resolve_config(args)
    except (ConfigError, RunFolderError) as exc:
        parser.error(str(exc))
    if args.print_config:
        sys.stdout.write(dump_config(config))
        return 0
    quiet_libraries()
    level = config.logging.level
    if args.verbose or args.quiet:
        level = console_level(verbose=args.verbose, quiet=args.quiet)
    console = configure_logging(level, fmt=config.logging.format)
    try:
        model_path = asyncio.run(resolve_model_path(config.model))
    except FileNotFoundError as exc:
        parser.error(str(exc))
    try:
        import torch

        if checkpoint is not None:
            check_resume(checkpoint.path, sharded=False)
        check_memory(config, model_path, world_size=1, sharded=False, on_gpu=torch.cuda.is_available())
    except ConfigError as exc:
        parser.error(str(exc))
    except MemoryBudgetError as exc:
        parser.exit(EXIT_USAGE, f"envtune-run: error: {exc}\n")
    return run_training(config, folder, checkpoint, console=console, level=level)


def run_training(
    config: Config,
    folder: RunFolder | None,
    checkpoint: Checkpoint | None,
    learner: PolicyLearner | None = None,
    *,
    console: Console | None = None,
    level: str | None = None,
) -> int:
    """Create (or reopen) the run folder, run the training, write the report; the folder's path is
    the last line on stdout. Returns the exit code (see the module docstring). ``learner``: the
    sharded learner on rank 0 of a ``torchrun`` job. ``console`` and ``level``: the logging already
    configured (else configured here)."""
    from envtune.runtime.watchdog import NoProgressError

    level = level or config.logging.level
    if console is None:
        console = configure_logging(level, fmt=config.logging.format)
    try:
        if folder is None:
            folder = RunFolder.create(Path(config.run.out_dir), config.run.name)
        else:
            assert checkpoint is not None
            folder.truncate_after(checkpoint.step)
        if config.logging.json_log:
            configure_logging(level, folder.path / LOG_FILE, console=console, fmt=config.logging.format)
        folder.write_config(dump_config(config))
    except OSError as exc:  # read-only or full output folder: nothing was overwritten (atomic writes)
        return _fail(describe_os_error(exc, config.run.out_dir))
    try:
        sinks = open_run_sinks(folder.path, config.metrics, config_io.to_dict(config))
    except (SinkUnavailable, ValueError) as exc:
        sys.stderr.write(f"envtune-run: error: {exc}\n")
        return EXIT_USAGE
    log.info("run_started", folder=str(folder.path), resume_step=checkpoint.step if checkpoint else None)
    signals: list[int] = []
    failure: str | None = None
    stalled: NoProgressError | None = None
    steps = 0
    try:
        with RunProgress(
            config.derived.total_step_budget,
            config.derived.num_stages,
            console=console,
            enabled=config.run.progress_bar,
            start_step=checkpoint.step if checkpoint else 0,
        ) as progress:
            steps = asyncio.run(
                _main_async(config, folder, checkpoint, sinks, progress.update, signals, learner)
            )
    except NoProgressError as exc:  # checkpointed on the way out; the report says so too
        stalled = exc
    except Exception as exc:
        failure = describe_failure(exc, str(folder.path))
        if failure is None:
            raise  # a bug: keep its traceback
    finally:
        sinks.close()
    if failure is not None:
        log.error("run_failed", folder=str(folder.path), error=failure)
        with contextlib.suppress(OSError):
            folder.append_metrics({"event": "run_failed", "step": steps, "error": failure})
    report = _write_report_quietly(folder)
    log.info("run_finished", folder=str(folder.path), steps=steps, report=str(report))
    sys.stdout.write(f"{folder.path}\n")
    sys.stdout.flush()
    if stalled is not None:
        sys.stderr.write(f"envtune-run: the run failed: {stalled}\n  report: {report}\n")
        return EXIT_NO_PROGRESS
    if failure is not None:
        with contextlib.suppress(OSError):
            if (kept := folder.latest_complete_checkpoint()) is not None:
                failure += f" (--resume {folder.path} continues from step {kept.step})"
        return _fail(failure)
    return signal_exit_code(signals[0]) if signals else 0


def quiet_libraries() -> None:
    """Hugging Face's download/loading progress bars off (the run has one display); set before
    transformers is imported, which reads it once."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _abort_now(signum: int, frame: object) -> None:
    """A second signal: the user wants out now. Threads (a learner step) cannot be interrupted, so
    leave at once; the checkpoints on disk are atomic, the last complete one is kept."""
    name = signal.Signals(signum).name
    sys.stderr.write(f"envtune-run: second {name}: aborting now, without a checkpoint\n")
    sys.stderr.flush()
    os._exit(signal_exit_code(signum))


def _write_report_quietly(folder: RunFolder) -> Path | None:
    from envtune.runtime.recipe.report import write_report

    try:
        return write_report(folder)
    except OSError as exc:  # a full disk must not hide the run's own error behind the report's
        log.error("report_failed", error=describe_os_error(exc, str(folder.report_dir)))
        return None


async def _main_async(
    config: Config,
    folder: RunFolder,
    checkpoint: Checkpoint | None,
    sinks: MetricSinks,
    on_step: Callable[[Mapping[str, Any]], None],
    signals: list[int],
    learner: PolicyLearner | None = None,
) -> int:
    from envtune.runtime.cli.engine_stack import open_engines, run_watched
    from envtune.runtime.recipe.training import train

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        signals.append(signum)
        name = signal.Signals(signum).name
        if not stop.is_set():
            log.warning("stop_requested", signal=name, hint="stopping with a checkpoint; a second one aborts")
            stop.set()
            return
        _abort_now(signum, None)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        async with open_engines(
            config.model, config.engine, config.learner.lora, log_dir=folder.path
        ) as engines:
            adopt_library_loggers()  # transformers is loaded now: its lines get the run's format
            log.info("engines_ready", engines=engines.description, model=str(engines.model_path))
            work = train(
                config,
                folder,
                engines.client,
                engines.client,
                engines.model_path,
                checkpoint=checkpoint,
                stop=stop,
                on_step=on_step,
                sinks=sinks,
                learner=learner,
            )
            return await run_watched(engines, work, stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if signals:  # stopping already: a second signal while the report is written still aborts at once
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, _abort_now)


if __name__ == "__main__":  # pragma: no cover
    main()
