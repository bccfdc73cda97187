"""``envtune-run``: one training run of the curriculum, from a config to a run folder with a report.

    envtune-run                                   # the CPU preset: tiny model, every stage briefly
    envtune-run my.toml --set rollout.group_size=8
    envtune-run --model /models/Qwen2.5-7B-Instruct --sglang http://h1:30000,http://h2:30000
    envtune-run --model /models/Qwen2.5-7B-Instruct --launch-sglang
    envtune-run --resume [RUN_DIR]                # the last complete checkpoint of a run
    torchrun --standalone --nproc-per-node 4 -m envtune.runtime.cli.run --model ... --launch-sglang

Under ``torchrun`` the learner is sharded over the ranks (``ranks.py``); rank 0 runs what follows.

Which config: a TOML file when given; else the paper preset when a real model is named
(``--model``/``--sglang``/``--launch-sglang``); else the CPU preset. ``--set`` overrides go last.

What it does: resolve the config, check the learner's memory estimate for the model (a run that
cannot fit is refused before anything loads), create (or reopen) the run folder, open the engine
stack (``engine_stack.py``; launched workers are watched: one that dies stops the run in order),
run ``recipe.training.train`` under signal handlers, write the report.

Stopping: Ctrl-C (SIGINT) or SIGTERM ends the run cleanly: no new work, in-flight episodes are
cancelled, a checkpoint of the last completed step is written, and the report is produced; a
second Ctrl-C aborts at once. The run folder's path is the last line written to stdout; logs and
the progress line go to stderr. A run with no learner step for ``run.no_progress_timeout_s`` fails:
checkpoint, report, the reason on stderr, exit status 3.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from envtune.optim.memory import MemoryBudgetError
from envtune.runtime.cli.engine_stack import resolve_model_path
from envtune.runtime.engines.sglang_launcher import LaunchError, WorkerDied
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
from envtune.runtime.recipe.learner_setup import check_memory, check_resume, under_torchrun
from envtune.runtime.recipe.run_folder import Checkpoint, RunFolder, RunFolderError

if TYPE_CHECKING:
    from envtune.optim.learner import PolicyLearner

log = structlog.get_logger(__name__)

EXIT_NO_PROGRESS = 3
"""Exit status of a run that stopped progressing (``run.no_progress_timeout_s``)."""


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
    """Entry point of ``envtune-run``."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if args.list_keys:
        for key, type_name, doc in config_io.describe_keys(Config):
            print(f"{key}  ({type_name})\n    {' '.join(doc.split())}")
        return
    if under_torchrun() and not args.print_config:
        from envtune.runtime.cli.ranks import main_ranks

        main_ranks(args, parser, resolve_config, run_training)  # the learner on every rank, the run on 0
        return
    try:
        config, folder, checkpoint = resolve_config(args)
    except (ConfigError, RunFolderError) as exc:
        parser.error(str(exc))
    if args.print_config:
        sys.stdout.write(dump_config(config))
        return
    configure_logging(config.logging.format, config.logging.level)
    model_path = asyncio.run(resolve_model_path(config.model))
    try:
        import torch

        if checkpoint is not None:
            check_resume(checkpoint.path, sharded=False)
        check_memory(config, model_path, world_size=1, sharded=False, on_gpu=torch.cuda.is_available())
    except ConfigError as exc:
        parser.error(str(exc))
    except MemoryBudgetError as exc:
        parser.exit(2, f"envtune-run: error: {exc}\n")
    run_training(config, folder, checkpoint)


def run_training(
    config: Config,
    folder: RunFolder | None,
    checkpoint: Checkpoint | None,
    learner: PolicyLearner | None = None,
) -> None:
    """Create (or reopen) the run folder, run the training, write the report; the folder's path is
    the last line on stdout. ``learner``: the sharded learner on rank 0 of a ``torchrun`` job."""
    if folder is None:
        folder = RunFolder.create(Path(config.run.out_dir), config.run.name)
    else:
        assert checkpoint is not None
        folder.truncate_after(checkpoint.step)
    folder.write_config(dump_config(config))
    log.info("run_started", folder=str(folder.path), resume_step=checkpoint.step if checkpoint else None)
    progress = ProgressLine(
        config.derived.total_step_budget, config.derived.num_stages, config.run.progress_bar
    )
    from envtune.runtime.watchdog import NoProgressError

    failure: NoProgressError | None = None
    try:
        steps = asyncio.run(_main_async(config, folder, checkpoint, progress, learner))
    except NoProgressError as exc:  # checkpointed on the way out; the report says so too
        failure, steps = exc, -1
    except (LaunchError, WorkerDied) as exc:
        # The engines failed (a worker died: the run stopped in order first): report, then say why.
        progress.close()
        from envtune.runtime.recipe.report import write_report

        write_report(folder)
        sys.stderr.write(f"envtune-run: error: {exc}\n{folder.path}\n")
        raise SystemExit(1) from None
    progress.close()
    from envtune.runtime.recipe.report import write_report

    report = write_report(folder)
    log.info("run_finished", folder=str(folder.path), steps=steps, report=str(report))
    sys.stdout.write(f"{folder.path}\n")
    sys.stdout.flush()
    if failure is not None:
        sys.stderr.write(f"envtune-run: the run failed: {failure}\n  report: {report}\n")
        sys.exit(EXIT_NO_PROGRESS)


async def _main_async(
    config: Config,
    folder: RunFolder,
    checkpoint: Checkpoint | None,
    progress: ProgressLine,
    learner: PolicyLearner | None = None,
) -> int:
    from envtune.runtime.cli.engine_stack import open_engines, run_watched
    from envtune.runtime.recipe.training import train

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None

    def on_signal(signame: str) -> None:
        if not stop.is_set():
            log.warning(
                "stop_requested", signal=signame, hint="stopping with a checkpoint; Ctrl-C again aborts"
            )
            stop.set()
        else:
            main_task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        async with open_engines(
            config.model, config.engine, config.learner.lora, log_dir=folder.path
        ) as engines:
            log.info("engines_ready", engines=engines.description, model=str(engines.model_path))
            work = train(
                config,
                folder,
                engines.client,
                engines.client,
                engines.model_path,
                checkpoint=checkpoint,
                stop=stop,
                on_step=progress.update,
                learner=learner,
            )
            return await run_watched(engines, work, stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


if __name__ == "__main__":  # pragma: no cover
    main()
