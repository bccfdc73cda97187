"""The run's learner, built before anything expensive: the memory check, then one process or FSDP2 ranks.

``envtune-run`` trains in one process (``optim.learner.Learner``) unless ``torchrun`` started it
(``WORLD_SIZE`` in the environment, one process included): then every rank builds a
``ShardedCore`` (``optim/distributed.py``), rank 0 wraps its core in a ``ShardedLearner`` for the
runtime and the other ranks serve it.

Before a model is loaded, ``check_memory`` estimates the learner's per-GPU peak for the configured
model from its ``config.json`` (``optim/memory.py``: the micro-batch budget, the longest episode
``sampling.max_episode_tokens``, gradient checkpointing, chunked log-probabilities, LoRA, the
number of ranks), logs it, and refuses a configuration that cannot fit (``MemoryBudgetError`` with
what to change) against ``learner.memory.capacity_gib`` or the CUDA device's total memory.

Left out: the process around the ranks (``runtime/cli/ranks.py``) and the training loop
(``training.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from envtune.optim.memory import GIB, MemoryEstimate, check_fits, estimate_for_config
from envtune.runtime.recipe.config import Config, ConfigError

if TYPE_CHECKING:
    from envtune.optim.distributed import DistributedContext, ShardedCore
    from envtune.optim.learner import Learner

log = structlog.get_logger(__name__)


def under_torchrun() -> bool:
    """True when torchrun (or another launcher setting the torch.distributed environment) started us."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def check_memory(
    config: Config, model_path: Path, *, world_size: int, sharded: bool, on_gpu: bool
) -> MemoryEstimate | None:
    """Log the learner's per-GPU estimate for ``model_path`` and refuse one that cannot fit.

    The capacity is ``learner.memory.capacity_gib``, else the CUDA device's total on a GPU; on a CPU
    without a capacity set the estimate is only logged. Returns the estimate (None for a model the
    estimate does not know). Raises ``MemoryBudgetError``.
    """
    try:
        model_config: Any = json.loads((model_path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        where = model_path / "config.json"
        raise FileNotFoundError(f"{where}: cannot read the model's config ({exc})") from exc
    estimate = estimate_for_config(
        model_config,
        config.learner,
        world_size=world_size,
        sharded=sharded,
        on_gpu=on_gpu,
        max_sequence_tokens=config.sampling.max_episode_tokens,
    )
    memory = config.learner.memory
    capacity: int | None = None
    if memory.capacity_gib is not None:
        capacity = int(memory.capacity_gib * GIB)
    elif on_gpu:
        import torch

        capacity = int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    if estimate is None:
        log.warning("learner_memory_estimate_unavailable", model=str(model_path))
        return None
    log.info(
        "learner_memory_estimate",
        per_gpu_gib=round(estimate.total / GIB, 1),
        capacity_gib=round(capacity / GIB, 1) if capacity is not None else None,
        ranks=world_size,
        detail=estimate.describe(),
    )
    if capacity is not None and memory.refuse:
        check_fits(estimate, capacity)
    return estimate


def check_resume(checkpoint_path: Path, *, sharded: bool) -> None:
    """ConfigError unless the checkpoint's learner state was written by the kind of learner this run
    builds: a sharded state (``torchrun``, any number of ranks) or a single-process one. Read before
    the engines start (the file is memory-mapped, not loaded)."""
    import torch
    from envtune.optim.distributed import SHARDED_STATE_FORMAT
    from envtune.runtime.recipe.learner_actor import LEARNER_STATE_FILE

    path = checkpoint_path / LEARNER_STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError) as exc:
        raise ConfigError(f"--resume: cannot read {path}: {exc}") from exc
    written_sharded = isinstance(state, dict) and state.get("format") == SHARDED_STATE_FORMAT
    if written_sharded and not sharded:
        raise ConfigError(
            f"--resume: {checkpoint_path} was written by the sharded learner (torchrun); resume it "
            "under torchrun, with any number of ranks: torchrun --standalone --nproc-per-node 1 "
            "-m envtune.runtime.cli.run --resume ..."
        )
    if sharded and not written_sharded:
        raise ConfigError(
            f"--resume: {checkpoint_path} was written by the single-process learner; resume it "
            "without torchrun"
        )


def load_policy_model(path: Path, *, gpu: bool | None = None, to_device: bool = True) -> Any:
    """The policy model for the learner: bf16 for a GPU, fp32 on the CPU.

    ``gpu`` None: whether CUDA is available. ``to_device`` False leaves a GPU model's weights on the
    CPU (a sharded rank: ``fully_shard`` moves only its shards to the GPU).
    """
    import torch
    from transformers import AutoModelForCausalLM

    gpu = torch.cuda.is_available() if gpu is None else gpu
    if not gpu:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    return model.to("cuda") if to_device else model


def build_learner(config: Config, model_path: Path) -> Learner:
    """The single-process learner (loads the model)."""
    from envtune.optim.learner import Learner

    # The learner divides logits by the rollout temperature to match the behaviour logprobs.
    return Learner(load_policy_model(model_path), config.learner, temperature=config.sampling.temperature)


def build_sharded_core(
    config: Config, model_path: Path, context: DistributedContext, control: Any
) -> ShardedCore:
    """This rank's part of the sharded learner (collective: every rank calls it, in step).

    The model is loaded on the CPU; ``fully_shard`` moves each rank's shards to its device. The
    same seed on every rank before LoRA is attached, and rank 0's initial adapter broadcast, make
    the ranks start identical.
    """
    import torch
    from envtune.optim.distributed import ShardedCore

    model = load_policy_model(model_path, gpu=context.device.type == "cuda", to_device=False)
    torch.manual_seed(config.run.seed)
    return ShardedCore(
        model,
        config.learner,
        context=context,
        temperature=config.sampling.temperature,
        control=control,
    )
