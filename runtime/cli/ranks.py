"""``envtune-run`` under ``torchrun``: the learner sharded over N ranks (FSDP2), the runtime on rank 0.

    torchrun --standalone --nproc-per-node 4 -m envtune.runtime.cli.run --model M --launch-sglang
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank $NODE_RANK --rdzv-backend c10d \\
        --rdzv-endpoint learn0:29500 --rdzv-id $RUN_ID -m envtune.runtime.cli.run --model M --sglang URLS

Every rank, in this order: join the job (NCCL with one GPU per rank, else gloo) and make the gloo
control group; rank 0 resolves the config (the run's own ``config.toml`` with ``--resume``) and the
model folder (building the tiny model when none is named) and sends both to the others, or the
error that stops them all; every rank checks the learner's per-GPU memory estimate for the job's
size and all stop when any refuses, before a model is loaded; every rank loads the model and builds
its ``ShardedCore`` (a collective). Ranks >= 1 then serve rank 0's commands until rank 0 closes the
learner, and exit 0. Rank 0 runs the usual run (``run.run_training``: run folder, engines, training,
checkpoints, report) with a ``ShardedLearner`` in place of the single-process one, and closes it
whatever happens.

Paths: the model folder must be readable at the same path on every node; the run folder (adapters
are published there and loaded by every SGLang worker) on a filesystem the workers can read.
Checkpoints hold the gathered adapter and optimizer, so ``--resume`` works with any number of ranks
under ``torchrun``, not in a plain process (its learner is not sharded).

Signals: Ctrl-C in the terminal reaches every rank; while serving, ranks >= 1 ignore SIGINT and
SIGTERM (rank 0's clean stop still needs them for its final checkpoint), and leave when rank 0
closes the learner; torchrun tears the job down if rank 0 dies.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from envtune.optim.memory import MemoryBudgetError
from envtune.runtime.cli.engine_stack import resolve_model_path
from envtune.runtime.recipe import config_io
from envtune.runtime.recipe.config import Config, ConfigError
from envtune.runtime.recipe.learner_setup import build_sharded_core, check_memory, check_resume
from envtune.runtime.recipe.progress import configure_logging
from envtune.runtime.recipe.run_folder import Checkpoint, RunFolder, RunFolderError

if TYPE_CHECKING:
    from envtune.optim.learner import PolicyLearner

log = structlog.get_logger(__name__)

CONFIG_ERROR_EXIT = 2
"""Exit status of every rank when the config, the run folder or the memory check stops the job."""


def _share(obj: Any, group: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank (over ``group``, the default group when None)."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def main_ranks(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    resolve_config: Callable[[argparse.Namespace], tuple[Config, RunFolder | None, Checkpoint | None]],
    run_training: Callable[[Config, RunFolder | None, Checkpoint | None, PolicyLearner], int],
) -> int:
    """One rank of ``envtune-run`` (see the module docstring); returns the exit code: rank 0's run's,
    0 on ranks >= 1 once they have served.

    ``resolve_config`` and ``run_training`` are ``run.py``'s (passed in: ``run`` imports this module).
    """
    import torch
    import torch.distributed as dist
    from envtune.optim.distributed import ShardedLearner, control_group, init_distributed, serve_worker

    context = init_distributed()
    rank0 = context.rank == 0
    folder: RunFolder | None = None
    checkpoint: Checkpoint | None = None
    message: dict[str, Any] = {}
    if rank0:
        try:
            config, folder, checkpoint = resolve_config(args)
            if checkpoint is not None:
                check_resume(checkpoint.path, sharded=True)
            path = asyncio.run(resolve_model_path(config.model))
            message = {"config": config_io.to_dict(config), "model_path": str(path)}
        except (ConfigError, RunFolderError, FileNotFoundError) as exc:
            message = {"error": str(exc)}
    message = _share(message)
    if "error" in message:
        dist.destroy_process_group()
        if rank0:
            parser.error(message["error"])
        raise SystemExit(CONFIG_ERROR_EXIT)
    config = config_io.from_dict(Config, message["config"])
    model_path = Path(message["model_path"])
    control = control_group(config.learner)
    # The run's own logging on every rank (rank 0 adds the run folder's log file once it has one).
    configure_logging(config.logging.level if rank0 else "warning", fmt=config.logging.format)
    log.info("ranks_joined", rank=context.rank, world_size=context.world_size, device=str(context.device))

    # The memory check on every rank (its own device); all stop when any refuses.
    refusal: str | None = None
    try:
        check_memory(
            config,
            model_path,
            world_size=context.world_size,
            sharded=True,
            on_gpu=context.device.type == "cuda",
        )
    except (MemoryBudgetError, FileNotFoundError) as exc:
        refusal = f"rank {context.rank}: {exc}"
    refusals: list[Any] = [None] * context.world_size
    dist.all_gather_object(refusals, refusal, group=control)
    first = next((r for r in refusals if r is not None), None)
    if first is not None:
        dist.destroy_process_group()
        if rank0:
            parser.exit(CONFIG_ERROR_EXIT, f"envtune-run: error: {first}\n")
        raise SystemExit(CONFIG_ERROR_EXIT)

    on_device = torch.cuda.device(context.device) if context.device.type == "cuda" else nullcontext()
    with on_device:
        core = build_sharded_core(config, model_path, context, control)
    if not rank0:
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            served = serve_worker(core)
        finally:
            signal.signal(signal.SIGTERM, previous)
        log.info("rank_done", rank=context.rank, commands=served)
        dist.destroy_process_group()
        return 0
    learner = ShardedLearner(core)
    try:
        code = run_training(config, folder, checkpoint, learner)
    finally:
        learner.close()
        dist.destroy_process_group()
    sys.stdout.flush()
    return code
