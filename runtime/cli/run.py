"""``envtune-run``: one training run of the curriculum, from a config to a run folder with a report.

    envtune-run                                   # the CPU preset: tiny model, every stage briefly
    envtune-run my.toml --set rollout.group_size=8
    envtune-run --model /models/Qwen2.5-7B-Instruct --sglang http://h1:30000,http://h2:30000
    envtune-run --model /models/Qwen2.5-7B-Instruct --launch-sglang
    envtune-run --resume [RUN_DIR]                # the last complete checkpoint of a run

Which config: a TOML file when given; else the paper preset when a real model is named
(``--model``/``--sglang``/``--launch-sglang``); else the CPU preset. ``--set`` overrides go last.

What it does: resolve the config, create (or reopen) the run folder, open the engine stack
(``engine_stack.py``), run ``recipe.training.train`` under signal handlers, write the report.

Stopping: Ctrl-C (SIGINT) or SIGTERM ends the run cleanly: no new work, in-flight episodes are
cancelled, a checkpoint of the last completed step is written, the report is produced, and the
process exits 130 (SIGINT) or 143 (SIGTERM); a second signal aborts at once, without a checkpoint
(the last complete one is kept). A run that cannot go on (the engine is gone, the disk is full, the
output folder is read-only) ends with one line saying what to do, the report, and exit code 1;
bad arguments exit 2. The run folder's path is the last line written to stdout; logs and the
progress line go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog
from envtune.runtime.cli.exits import (
    EXIT_FAILED,
    SIGINT_EXIT,
    describe_failure,
    describe_os_error,
    signal_exit_code,
)
from envtune.runtime.logs import configure_logging
from envtune.runtime.recipe import config_io
from envtune.runtime.recipe.config import (
    CPU_PRESET,
    PAPER_PRESET,
    Config,
    ConfigError,
    dump_config,
    load_config,
)
from envtune.runtime.recipe.run_folder import Checkpoint, RunFolder, RunFolderError

log = structlog.get_logger(__name__)


# --- progress -------------------------------------------------------------------------------------------


class ProgressLine:
    """A one-line progress display on stderr (rewritten in place on a terminal, a line per step otherwise)."""

    def __init__(self, total_steps: int, num_stages: int, enabled: bool) -> None:
        self.total = total_steps
        self.num_stages = num_stages
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()

    def update(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        step = int(record["step"])
        width = 24
        filled = min(width, int(width * step / self.total)) if self.total else 0
        bar = "#" * filled + "." * (width - filled)
        of = f"/{self.total}" if self.total else ""
        reward = record.get("train/reward", record.get("learner/reward_mean"))
        reward_text = f"{reward:.3f}" if isinstance(reward, float) else "-"
        elapsed = time.monotonic() - self.started
        text = (
            f"[{bar}] step {step}{of} | stage {record['stage']}/{self.num_stages} {record['stage_name']} | "
            f"reward {reward_text} | {record.get('rollout/episodes_per_s', 0.0):.2f} ep/s | "
            f"{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}"
        )
        sys.stderr.write(("\r" + text) if self.tty else (text + "\n"))
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


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
        "config", nargs="?", help="TOML config (default: CPU preset, or the paper preset with --model)"
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
        "--launch-sglang", action="store_true", help="start `python -m sglang.launch_server` here"
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
        if args.config:
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
    if args.config:
        path = Path(args.config)
    elif args.model or args.sglang or args.launch_sglang:
        path = PAPER_PRESET
    else:
        path = CPU_PRESET
    config_io.read_toml(path)  # a clear error for a missing or broken file before anything else
    return load_config(path, overrides), None, None


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
    try:
        config, folder, checkpoint = resolve_config(args)
    except (ConfigError, RunFolderError) as exc:
        parser.error(str(exc))
    if args.print_config:
        sys.stdout.write(dump_config(config))
        return 0
    configure_logging(config.logging.format, config.logging.level)
    try:
        if folder is None:
            folder = RunFolder.create(Path(config.run.out_dir), config.run.name)
        else:
            assert checkpoint is not None
            folder.truncate_after(checkpoint.step)
        folder.write_config(dump_config(config))
    except OSError as exc:  # read-only or full output folder: nothing was overwritten (atomic writes)
        return _fail(describe_os_error(exc, config.run.out_dir))
    log.info("run_started", folder=str(folder.path), resume_step=checkpoint.step if checkpoint else None)
    progress = ProgressLine(
        config.derived.total_step_budget, config.derived.num_stages, config.run.progress_bar
    )
    signals: list[int] = []
    failure: str | None = None
    steps = 0
    try:
        steps = asyncio.run(_main_async(config, folder, checkpoint, progress, signals))
    except Exception as exc:
        failure = describe_failure(exc, str(folder.path))
        if failure is None:
            raise  # a bug: keep its traceback
    progress.close()
    if failure is not None:
        log.error("run_failed", folder=str(folder.path), error=failure)
        with contextlib.suppress(OSError):
            folder.append_metrics({"event": "run_failed", "step": steps, "error": failure})
    report = _write_report_quietly(folder)
    log.info("run_finished", folder=str(folder.path), steps=steps, report=str(report))
    sys.stdout.write(f"{folder.path}\n")
    sys.stdout.flush()
    if failure is not None:
        with contextlib.suppress(OSError):
            if (kept := folder.latest_complete_checkpoint()) is not None:
                failure += f" (--resume {folder.path} continues from step {kept.step})"
        return _fail(failure)
    return signal_exit_code(signals[0]) if signals else 0


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
    progress: ProgressLine,
    signals: list[int],
) -> int:
    from envtune.runtime.cli.engine_stack import open_engines
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
        # A second signal: the user wants out now. Threads (a learner step) cannot be interrupted,
        # so leave at once; the checkpoints on disk are atomic, the last complete one is kept.
        sys.stderr.write(f"envtune-run: second {name}: aborting now, without a checkpoint\n")
        sys.stderr.flush()
        os._exit(signal_exit_code(signum))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        async with open_engines(config.model, config.engine, config.learner.lora) as engines:
            log.info("engines_ready", engines=engines.description, model=str(engines.model_path))
            return await train(
                config,
                folder,
                engines.client,
                engines.client,
                engines.model_path,
                checkpoint=checkpoint,
                stop=stop,
                on_step=progress.update,
            )
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


if __name__ == "__main__":  # pragma: no cover
    main()
