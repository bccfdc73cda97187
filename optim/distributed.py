"""The LoRA learner sharded over torch.distributed ranks with FSDP2 (``fully_shard``).

Process layout under ``torchrun``: rank 0 runs the asyncio runtime and holds a ``ShardedLearner``,
which has the single-process ``Learner``'s surface (``step``, ``save_adapter``, ``state_dict``,
``load_state_dict``, ``policy_version``). Every other rank builds the same ``ShardedCore`` and calls
``serve_worker``: it waits for rank 0's commands on a gloo control group and runs its part of each
collective. Rank 0 scatters one message per rank; a step's message holds that rank's share of each
mini-batch, so ranks train on different (uneven) token counts.

Building a core (every rank, same order): LoRA is attached first (seeded, then rank 0's initial
adapter is broadcast so every rank starts identical), gradient checkpointing and packed attention
are switched on, ``fully_shard`` wraps each decoder layer and then the root, with bf16 parameters and
fp32 gradient reduction on GPU (fp32 throughout on CPU), and the optimizer is built last, on the
sharded parameters (an optimizer built before sharding holds stale tensors and silently never
updates).

A step (``ShardedCore.run_step``), identical in arithmetic to ``Learner.step`` on the whole batch:
rank 0 computes the group advantages over the full batch and splits each mini-batch across ranks
(longest sequence to the least-loaded rank). Every rank all-gathers its loss-token count and
micro-batch count; the loss is normalised by the *global* loss-token count and multiplied by the
world size, because FSDP2 averages gradients over ranks (per-rank means would weight a rank's
tokens by how few it holds). Ranks with fewer micro-batches run zero-weight dummy ones: FSDP's
all-gathers and reduce-scatters must happen the same number of times on every rank. Clipping uses
the global norm, so every rank takes (or skips) the same update.

Publishing (``save_adapter``) gathers only the LoRA tensors (``full_tensor()``), on every rank in
the same order; rank 0 writes ``adapter_model.safetensors`` + ``adapter_config.json`` to a temporary
folder beside the target and renames it into place. Checkpoints use torch.distributed.checkpoint's
state-dict helpers with full (gathered, CPU) state on rank 0, so a run can resume on another number
of ranks; loading broadcasts from rank 0.

Failure model: a command that raises on one rank leaves the others in a collective; torchrun then
tears the job down (its agent stops all ranks when one exits). Rank 0 validates every batch before
sending it, so malformed input raises there and never reaches the workers.

Deliberately left out: HSDP (2-D meshes), CPU offload, sharding across the inference GPUs. The
loss arithmetic mirrors ``learner.py``; ``benchmarks/fsdp_equivalence.py`` (run by the tests)
fails when the two drift apart.
"""

from __future__ import annotations

import contextlib
import enum
import heapq
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import structlog
import torch
import torch.distributed as dist

from .advantages import group_advantages
from .config import Batching, LearnerConfig
from .learner import StepMetrics, _split
from .lora import attach_lora, reference_mode
from .lora import trainable_parameters as lora_parameters
from .losses import LossStats, policy_loss
from .memory import MemoryEstimate, ModelShape, check_fits, estimate_learner_memory
from .packing import (
    ModelBatch,
    build_batch,
    enable_packed_attention,
    plan_microbatches,
    token_logprobs,
)

log = structlog.get_logger(__name__)

SHARDED_STATE_FORMAT = "envtune-sharded-learner-v1"
"""Marks a ``ShardedLearner.state_dict``; the single-process learner's state has no such key."""


class TrajectoryLike(Protocol):
    """What a step reads from a trajectory (``agents.trajectory.Trajectory`` satisfies it)."""

    task_id: str
    group_id: str
    token_ids: Sequence[int]
    loss_mask: Sequence[bool]
    behavior_logprobs: Sequence[float]
    policy_versions: Sequence[int]
    reward: float
    progress: float

    @property
    def num_model_tokens(self) -> int: ...


@dataclass(frozen=True, slots=True)
class ShardingSettings:
    """How the learner is sharded (the run config's ``learner.distributed`` section)."""

    mixed_precision: bool = True
    """On GPU: compute in bf16 (FSDP2 ``param_dtype``) and reduce gradients in fp32. CPU runs are
    always fp32 (gloo, and exact comparison with the single-process learner)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in backward (non-reentrant): activations drop from all layers'
    saved tensors to their inputs plus one layer; costs one extra forward."""
    reshard_after_forward: bool = True
    """Free each layer's gathered weights after its forward (re-gathered in backward): ZeRO-3
    memory. False keeps them (ZeRO-2: less communication, more memory)."""
    max_sequence_tokens: int = 0
    """Longest sequence the run can produce (the rollout context limit), for the memory check;
    0 = only the micro-batch budget."""
    logits_chunk_tokens: int | None = None
    """Positions whose logits exist at once, for the memory check (None: all of a micro-batch)."""
    memory_capacity_gib: float | None = None
    """Per-device memory the check compares against; None = the CUDA device's total (no check on
    CPU)."""
    check_memory: bool = True
    """Refuse to start when the per-GPU estimate exceeds the capacity."""
    control_timeout_s: float = 7 * 24 * 3600.0
    """How long workers wait for rank 0's next command (rollouts between steps can take long)."""

    def __post_init__(self) -> None:
        if self.max_sequence_tokens < 0:
            raise ValueError(f"max_sequence_tokens must be >= 0, got {self.max_sequence_tokens}")
        if self.logits_chunk_tokens is not None and self.logits_chunk_tokens < 1:
            raise ValueError(f"logits_chunk_tokens must be >= 1, got {self.logits_chunk_tokens}")
        if self.control_timeout_s <= 0:
            raise ValueError("control_timeout_s must be > 0")


@dataclass(frozen=True, slots=True)
class DistributedContext:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(backend: str | None = None, *, timeout_s: float = 1800.0) -> DistributedContext:
    """Join the job torchrun started (env:// rendezvous): NCCL with one GPU per rank, else gloo.

    Idempotent: an initialised default group is reused (tests start it themselves).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


# --- messages ---------------------------------------------------------------------------------------


class Command(enum.StrEnum):
    """What rank 0 asks every rank to do."""

    STEP = "step"
    SAVE_ADAPTER = "save_adapter"
    STATE_DICT = "state_dict"
    LOAD_STATE_DICT = "load_state_dict"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True, slots=True)
class _Item:
    """One trajectory as a rank trains it."""

    token_ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]
    behavior: tuple[float, ...]
    """Behaviour logprobs of the predicted positions only."""
    advantage: float


@dataclass(frozen=True, slots=True)
class _Message:
    command: Command
    payload: Any = None
    """STEP: this rank's items per mini-batch; LOAD_STATE_DICT: the counters."""


@dataclass(frozen=True, slots=True)
class _StepOutcome:
    """Global results of a step, the same on every rank."""

    loss: float
    stats: LossStats
    grad_norm: float
    num_microbatches: int
    applied: int


# --- the per-rank learner ----------------------------------------------------------------------------


class ShardedCore:
    """The sharded model and optimizer of one rank; every method is a collective over all ranks."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: LearnerConfig,
        settings: ShardingSettings = ShardingSettings(),
        *,
        context: DistributedContext,
        temperature: float = 1.0,
    ) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (greedy samples cannot be trained), got {temperature}")
        self.config = config
        self.temperature = temperature
        """The rollouts' sampling temperature: logits are divided by it (as ``Learner`` does)."""
        self.settings = settings
        self.context = context
        self.device = context.device
        # Small objects and counts travel on CPU tensors over gloo, whatever the training backend.
        self.control = dist.new_group(backend="gloo", timeout=timedelta(seconds=settings.control_timeout_s))
        on_gpu = self.device.type == "cuda"
        base_config = model.config
        self.memory = self._check_memory(base_config, on_gpu)
        self.model = attach_lora(model, config.lora)
        self._broadcast_lora()
        if settings.gradient_checkpointing:
            _enable_checkpointing(self.model.get_base_model())
        if config.batching is Batching.PACKED:
            enable_packed_attention(self.model)
        mesh = init_device_mesh(self.device.type, (context.world_size,))
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if on_gpu and settings.mixed_precision
            else MixedPrecisionPolicy()
        )
        layers = _decoder_layers(self.model)
        if not layers:
            raise ValueError("found no decoder layers (_no_split_modules) to shard")
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=settings.reshard_after_forward)
        fully_shard(self.model, mesh=mesh, mp_policy=mp, reshard_after_forward=settings.reshard_after_forward)
        self.params = lora_parameters(self.model)
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=config.lr,
            betas=config.betas,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
        self.policy_version = 0
        self.num_steps = 0
        self._dummy: ModelBatch | None = None

    # --- set-up -------------------------------------------------------------------------------------

    def _check_memory(self, base_config: Any, on_gpu: bool) -> MemoryEstimate | None:
        try:
            shape = ModelShape.from_hf_config(base_config)
        except (TypeError, ValueError, AttributeError):
            return None  # not a Qwen2/Llama-shaped config: no estimate
        estimate = estimate_learner_memory(
            shape,
            world_size=self.context.world_size,
            lora_rank=self.config.lora.rank,
            lora_targets=self.config.lora.target_modules,
            micro_batch_tokens=self.config.micro_batch_tokens,
            max_sequence_tokens=self.settings.max_sequence_tokens,
            gradient_checkpointing=self.settings.gradient_checkpointing,
            param_dtype="bfloat16" if on_gpu and self.settings.mixed_precision else "float32",
            logits_chunk_tokens=self.settings.logits_chunk_tokens,
            workspace_gib=2.0 if on_gpu else 0.0,
        )
        capacity = None
        if self.settings.memory_capacity_gib is not None:
            capacity = int(self.settings.memory_capacity_gib * 1024**3)
        elif on_gpu:
            capacity = torch.cuda.get_device_properties(self.device).total_memory
        if self.context.rank == 0:
            log.info("learner_memory_estimate", estimate=estimate.describe(), capacity_bytes=capacity)
        if capacity is not None and self.settings.check_memory:
            check_fits(estimate, capacity)
        return estimate

    def _broadcast_lora(self) -> None:
        """Every rank starts from rank 0's adapter (peft draws LoRA A from each rank's own RNG)."""
        for p in lora_parameters(self.model):
            buffer = p.detach().to("cpu", copy=True)
            dist.broadcast(buffer, src=0, group=self.control)
            with torch.no_grad():
                p.copy_(buffer.to(p.device))

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        """The CUDA current device is per thread: rank 0 runs commands from the runtime's threads."""
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                yield
        else:
            yield

    # --- commands -------------------------------------------------------------------------------------

    def receive(self, messages: Sequence[_Message] | None = None) -> _Message:
        """Rank 0 passes one message per rank; every rank returns its own."""
        out: list[Any] = [None]
        dist.scatter_object_list(
            out, list(messages) if messages is not None else None, src=0, group=self.control
        )
        return out[0]

    def execute(self, message: _Message) -> Any:
        with self.on_device():
            match message.command:
                case Command.STEP:
                    return self.run_step(message.payload)
                case Command.SAVE_ADAPTER:
                    return self.gather_adapter()
                case Command.STATE_DICT:
                    return self.gather_state()
                case Command.LOAD_STATE_DICT:
                    return self.load_state(message.payload)
                case _:
                    raise ValueError(f"unexpected command {message.command!r}")

    # --- a step ---------------------------------------------------------------------------------------

    def run_step(self, updates: Sequence[Sequence[_Item]]) -> _StepOutcome:
        """Train this rank's share of each mini-batch; collective (see the module docstring)."""
        world = self.context.world_size
        plans = [self._microbatches(items) for items in updates]
        local = torch.tensor(
            [
                [sum(len(it.behavior) for it in items), len(plan)]
                for items, plan in zip(updates, plans, strict=True)
            ],
            dtype=torch.int64,
        ).reshape(len(updates), 2)
        gathered = [torch.zeros_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=self.control)
        table = torch.stack(gathered)  # [rank, update, (loss tokens, micro-batches)]
        n_global = self._loss_normalizer(table)
        n_micro = table[:, :, 1].max(0).values.tolist()
        padded = [
            plan + [(self._dummy_batch(), ())] * (n - len(plan))
            for plan, n in zip(plans, n_micro, strict=True)
        ]
        proximal = None
        if len(padded) > 1:
            proximal = [[self._logprobs_no_grad(batch) for batch, _ in plan] for plan in padded]
        stats = LossStats.empty()
        total = 0.0
        grad_norm = 0.0
        applied = 0
        for u, plan in enumerate(padded):
            if n_global[u] == 0:
                raise ValueError(f"mini-batch {u} has no loss tokens on any rank")
            loss, mb_stats, grad_norm = self._update(
                plan, n_global[u], proximal[u] if proximal else None, world
            )
            total += loss
            stats = stats.merge(mb_stats)
            if not math.isfinite(grad_norm):
                log.warning("learner_nonfinite_grad", grad_norm=grad_norm, update=u, rank=self.context.rank)
                break
            applied += 1
        # Loss sums and stats are per rank; the step's are their sum (min/max for the extremes).
        parts: list[Any] = [None] * world
        real = sum(len(p) for p in plans)
        dist.all_gather_object(parts, (total, stats, real), group=self.control)
        merged = LossStats.empty()
        for _, s, _ in parts:
            merged = merged.merge(s)
        if applied:
            self.policy_version += 1
        self.num_steps += 1
        return _StepOutcome(
            loss=sum(p[0] for p in parts),
            stats=merged,
            grad_norm=grad_norm,
            num_microbatches=sum(p[2] for p in parts),
            applied=applied,
        )

    def _loss_normalizer(self, table: torch.Tensor) -> list[int]:
        """Loss tokens each update's loss is divided by: the count over *all* ranks.

        ``table`` is [rank, update, (loss tokens, micro-batches)]. (The equivalence benchmark
        overrides this with the per-rank count to show that its check catches per-rank means.)
        """
        return table[:, :, 0].sum(0).tolist()

    def _microbatches(self, items: Sequence[_Item]) -> list[tuple[ModelBatch, tuple[_Item, ...]]]:
        cfg = self.config
        sequences = [it.token_ids for it in items]
        masks = [it.loss_mask for it in items]
        groups = plan_microbatches([len(s) for s in sequences], cfg.micro_batch_tokens, cfg.batching)
        return [
            (build_batch(sequences, masks, group, cfg.batching, self.device), tuple(items[k] for k in group))
            for group in groups
        ]

    def _dummy_batch(self) -> ModelBatch:
        """Two tokens, one predicted: the smallest pass that runs every FSDP collective."""
        if self._dummy is None:
            self._dummy = build_batch([[0, 0]], [[False, True]], [0], self.config.batching, self.device)
        return self._dummy

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.config.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.config.autocast_dtype))

    def _logprobs_no_grad(self, batch: ModelBatch, *, reference: bool = False) -> torch.Tensor:
        self.model.eval()
        ref = reference_mode(self.model) if reference else contextlib.nullcontext()
        with torch.no_grad(), ref, self._autocast():
            # Full logits: the chunked path calls the decoder under the FSDP root, which mixes DTensors.
            logp, _ = token_logprobs(
                self.model, batch, temperature=self.temperature, logits_chunk_elements=0
            )
        return logp

    def _update(
        self,
        plan: Sequence[tuple[ModelBatch, tuple[_Item, ...]]],
        n_global: int,
        proximal: Sequence[torch.Tensor] | None,
        world: int,
    ) -> tuple[float, LossStats, float]:
        """One optimizer update over this rank's micro-batches of a mini-batch (as ``Learner._update``)."""
        from torch.distributed.tensor import DTensor

        cfg = self.config
        stats = LossStats.empty()
        total = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        for k, (batch, items) in enumerate(plan):
            dummy = not items
            if dummy:
                behavior = torch.zeros(1, dtype=torch.float32, device=self.device)
                advantages = torch.zeros(1, dtype=torch.float32, device=self.device)
            else:
                behavior = torch.tensor(
                    [x for it in items for x in it.behavior], dtype=torch.float32, device=self.device
                )
                advantages = torch.tensor(
                    [it.advantage for it in items for _ in it.behavior],
                    dtype=torch.float32,
                    device=self.device,
                )
            ref = self._logprobs_no_grad(batch, reference=True) if cfg.loss.kl_coef > 0 else None
            self.model.train()
            with self._autocast():
                logp, entropy = token_logprobs(
                    self.model,
                    batch,
                    temperature=self.temperature,
                    with_entropy=True,
                    logits_chunk_elements=0,
                )
            if entropy is not None and cfg.loss.entropy_coef == 0:
                entropy = entropy.detach()
            prox = proximal[k] if proximal is not None else logp.detach()
            loss, mb_stats = policy_loss(
                logp,
                prox,
                behavior,
                advantages,
                torch.ones_like(behavior, dtype=torch.bool),
                num_tokens=n_global,
                config=cfg.loss,
                sequence_index=batch.sequence_index,
                entropy=entropy,
                ref_logprobs=ref,
            )
            # FSDP2 averages gradients over ranks; x world turns that average into the global sum
            # of (token loss / global loss tokens). A dummy pass contributes exactly zero.
            (loss * (0.0 if dummy else float(world))).backward()
            if not dummy:
                total += float(loss.detach())
                stats = stats.merge(mb_stats)
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        grad_norm = float(norm)
        if math.isfinite(grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, stats, grad_norm

    # --- adapters and checkpoints -----------------------------------------------------------------------

    def gather_adapter(self) -> dict[str, torch.Tensor] | None:
        """The full LoRA tensors, keyed as peft saves them; on rank 0 (None elsewhere)."""
        from peft import get_peft_model_state_dict
        from torch.distributed.tensor import DTensor

        full: dict[str, torch.Tensor] = {}
        # Same dict order on every rank (same model); each full_tensor() is a collective.
        for key, value in get_peft_model_state_dict(self.model).items():
            tensor = value.full_tensor() if isinstance(value, DTensor) else value
            if self.context.rank == 0:
                full[key] = tensor.detach().to("cpu", copy=True).contiguous()
        return full if self.context.rank == 0 else None

    def gather_state(self) -> dict[str, Any] | None:
        """Adapter and optimizer state, gathered to rank 0 on CPU (None elsewhere)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        model_state = get_model_state_dict(self.model, options=options)
        optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        if self.context.rank != 0:
            return None
        return {
            "format": SHARDED_STATE_FORMAT,
            # Copies: on one CPU rank the "gathered" tensors can be the live parameters themselves.
            "adapter": _detached_copy(model_state),
            "optimizer": _detached_copy(optim_state),
            "policy_version": self.policy_version,
            "num_steps": self.num_steps,
            "world_size": self.context.world_size,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state(self, payload: tuple[dict[str, Any] | None, int, int]) -> None:
        """Rank 0 holds the state; the others receive it by broadcast and keep their shards."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state, policy_version, num_steps = payload
        is_zero = self.context.rank == 0
        if is_zero and state is None:
            raise ValueError("rank 0 must hold the learner state it loads")
        # strict=False: the frozen base is not in the state (the model loaded it); LoRA keys are checked.
        options = StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True, ignore_frozen_params=True, strict=False
        )
        adapter = state["adapter"] if state is not None else {}
        result = set_model_state_dict(self.model, adapter, options=options)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if is_zero and (missing or result.unexpected_keys):
            raise ValueError(
                f"learner state does not fit the model: missing {missing[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}"
            )
        set_optimizer_state_dict(
            self.model, self.optimizer, state["optimizer"] if state is not None else {}, options=options
        )
        self.policy_version = policy_version
        self.num_steps = num_steps
        if state is not None and "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])


def _detached_copy(value: Any) -> Any:
    """``value`` with every tensor inside dicts, lists and tuples replaced by a detached clone."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detached_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_detached_copy(v) for v in value)
    return value


def _enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant per-layer checkpointing (transformers >= 5.24 renamed the method)."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules transformers never splits across devices (one per decoder layer)."""
    base: Any = getattr(model, "get_base_model", lambda: model)()
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in base.modules() if type(m).__name__ in names]


# --- rank 0's facade and the workers' loop -----------------------------------------------------------


class ShardedLearner:
    """Rank 0's learner: the ``Learner`` surface, each call run on every rank.

    Thread-safe like ``Learner``: one lock orders the commands, so the runtime may call ``step`` in
    one thread and ``save_adapter`` in another.
    """

    def __init__(self, core: ShardedCore) -> None:
        if core.context.rank != 0:
            raise ValueError("ShardedLearner lives on rank 0; other ranks run serve_worker(core)")
        self._core = core
        self._lock = threading.Lock()
        self._closed = False

    @property
    def model(self) -> torch.nn.Module:
        """The sharded peft model (parameters are DTensors; do not use it while a step runs)."""
        return self._core.model

    @property
    def config(self) -> LearnerConfig:
        return self._core.config

    @property
    def policy_version(self) -> int:
        return self._core.policy_version

    @property
    def num_steps(self) -> int:
        return self._core.num_steps

    @property
    def world_size(self) -> int:
        return self._core.context.world_size

    @property
    def memory_estimate(self) -> MemoryEstimate | None:
        return self._core.memory

    def _broadcast(self, messages: Sequence[_Message]) -> Any:
        if self._closed:
            raise RuntimeError("the sharded learner is closed")
        own = self._core.receive(messages)
        return self._core.execute(own)

    def step(self, trajectories: Sequence[TrajectoryLike]) -> StepMetrics:
        """Train on one batch across all ranks; raises ValueError on malformed input (nothing is sent)."""
        if not trajectories:
            raise ValueError("step needs at least one trajectory")
        for t in trajectories:
            if len(t.token_ids) != len(t.loss_mask) or len(t.token_ids) != len(t.behavior_logprobs):
                raise ValueError(f"trajectory {t.task_id}/{t.group_id}: per-token fields differ in length")
            if t.loss_mask and t.loss_mask[0]:
                raise ValueError(f"trajectory {t.task_id}/{t.group_id}: token 0 cannot be a loss token")
        with self._lock:
            started = time.perf_counter()
            plan, summary, lags, num_tokens = self._plan(trajectories)
            if plan is None:
                self._core.num_steps += 1  # nothing to train: no collective, workers stay in sync
                outcome = None
            else:
                outcome = self._broadcast([_Message(Command.STEP, plan[r]) for r in range(self.world_size)])
            metrics = _metrics(outcome, summary, lags, num_tokens, self.policy_version, started)
        log.info("learner_step", world_size=self.world_size, **metrics.as_dict())
        return metrics

    def _plan(
        self, trajectories: Sequence[TrajectoryLike]
    ) -> tuple[list[list[tuple[_Item, ...]]] | None, dict[str, Any], list[int], int]:
        cfg = self.config
        adv = group_advantages(
            [t.reward for t in trajectories], [t.group_id for t in trajectories], cfg.advantages
        )
        version = self.policy_version
        chosen = [i for i, t in enumerate(trajectories) if t.num_model_tokens > 0]
        rewards = [t.reward for t in trajectories]
        mean = sum(rewards) / len(rewards)
        summary = {
            "num_trajectories": len(trajectories),
            "num_trained": len(chosen),
            "num_groups": adv.num_groups,
            "num_zero_variance_groups": adv.num_zero_variance_groups,
            "reward_mean": mean,
            "reward_std": math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)),
            "progress_mean": sum(t.progress for t in trajectories) / len(trajectories),
            "lr": cfg.lr,
        }
        items: list[_Item] = []
        lags: list[int] = []
        for i in chosen:
            t = trajectories[i]
            idx = [j for j in range(1, len(t.token_ids)) if t.loss_mask[j]]
            items.append(
                _Item(
                    token_ids=tuple(t.token_ids),
                    loss_mask=tuple(bool(m) for m in t.loss_mask),
                    behavior=tuple(float(t.behavior_logprobs[j]) for j in idx),
                    advantage=float(adv.advantages[i]),
                )
            )
            lags.extend(version - t.policy_versions[j] for j in idx)
        num_tokens = sum(len(it.token_ids) for it in items)
        if not items:
            return None, summary, lags, num_tokens
        per_rank: list[list[tuple[_Item, ...]]] = [[] for _ in range(self.world_size)]
        for minibatch in _split(len(items), min(cfg.updates_per_step, len(items))):
            shares = assign_to_ranks([len(items[k].token_ids) for k in minibatch], self.world_size)
            for rank, share in enumerate(shares):
                per_rank[rank].append(tuple(items[minibatch[k]] for k in share))
        return per_rank, summary, lags, num_tokens

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The full LoRA tensors on CPU, keyed as peft saves them (``lora.adapter_state``'s twin)."""
        with self._lock:
            return self._broadcast([_Message(Command.SAVE_ADAPTER)] * self.world_size)

    def save_adapter(self, folder: Path) -> int:
        """Gather the adapter on all ranks; rank 0 writes it (peft layout) atomically into ``folder``."""
        with self._lock:
            tensors = self._broadcast([_Message(Command.SAVE_ADAPTER)] * self.world_size)
            write_adapter_folder(Path(folder), tensors, self._core.model.peft_config["default"])
            return self.policy_version

    def state_dict(self) -> dict[str, Any]:
        """Adapter and optimizer (gathered, CPU), counters and RNG: what ``load_state_dict`` restores."""
        with self._lock:
            return self._broadcast([_Message(Command.STATE_DICT)] * self.world_size)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict`` (written with any number of ranks) on every rank."""
        if state.get("format") != SHARDED_STATE_FORMAT:
            raise ValueError(
                "not a sharded learner state (written by the single-process Learner?); "
                "resume it with the learner that wrote it"
            )
        with self._lock:
            counters = (int(state["policy_version"]), int(state["num_steps"]))
            messages = [_Message(Command.LOAD_STATE_DICT, (None, *counters))] * self.world_size
            messages[0] = _Message(Command.LOAD_STATE_DICT, (state, *counters))
            self._broadcast(messages)

    def close(self) -> None:
        """Release the workers (their ``serve_worker`` returns). Idempotent."""
        with self._lock:
            if not self._closed:
                self._core.receive([_Message(Command.SHUTDOWN)] * self.world_size)
                self._closed = True

    def __enter__(self) -> ShardedLearner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def serve_worker(core: ShardedCore) -> int:
    """Ranks 1..N-1: run rank 0's commands until it shuts down; returns the commands served.

    SIGINT is ignored here: a Ctrl-C in the terminal reaches every rank, and rank 0's clean stop
    still needs the workers for its final checkpoint.
    """
    if core.context.rank == 0:
        raise ValueError("rank 0 holds the ShardedLearner; serve_worker is for the other ranks")
    previous = (
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if threading.current_thread() is threading.main_thread()
        else None
    )
    served = 0
    try:
        while True:
            message = core.receive()
            if message.command is Command.SHUTDOWN:
                return served
            core.execute(message)
            served += 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


# --- helpers -----------------------------------------------------------------------------------------


def assign_to_ranks(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Split sequence indices over ranks: longest first to the least-loaded rank (ties: lower rank).

    Deterministic; ranks may get uneven token counts, or nothing when there are fewer sequences
    than ranks. Each rank's indices come back in ascending order.
    """
    heap = [(0, r) for r in range(world_size)]
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        load, rank = heapq.heappop(heap)
        shares[rank].append(i)
        heapq.heappush(heap, (load + lengths[i], rank))
    return [sorted(s) for s in shares]


def write_adapter_folder(folder: Path, tensors: dict[str, torch.Tensor], peft_config: Any) -> None:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` so readers never see half of it.

    A new folder is built beside ``folder`` and renamed into place; into an existing folder each
    file is replaced atomically.
    """
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        peft_config.save_pretrained(str(tmp))
        if folder.exists() and any(folder.iterdir()):
            for f in tmp.iterdir():
                os.replace(f, folder / f.name)
        else:
            if folder.exists():
                folder.rmdir()
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _metrics(
    outcome: _StepOutcome | None,
    summary: dict[str, Any],
    lags: list[int],
    num_tokens: int,
    policy_version: int,
    started: float,
) -> StepMetrics:
    stats = outcome.stats if outcome is not None else LossStats.empty()
    n = stats.num_tokens
    duration = time.perf_counter() - started
    return StepMetrics(
        updated=outcome is not None and outcome.applied > 0,
        policy_version=policy_version,
        num_loss_tokens=n,
        num_tokens=num_tokens,
        masked_token_fraction=1.0 - n / num_tokens if num_tokens else 0.0,
        num_microbatches=outcome.num_microbatches if outcome is not None else 0,
        loss=outcome.loss if outcome is not None else 0.0,
        pg_loss=stats.mean(stats.pg_loss_sum),
        kl_ref=stats.mean(stats.kl_ref_sum),
        entropy=stats.mean(stats.entropy_sum),
        clip_fraction=stats.mean(stats.clipped),
        dual_clip_fraction=stats.mean(stats.dual_clipped),
        behavior_weight_mean=stats.mean(stats.weight_sum),
        behavior_weight_min=stats.weight_min if n else 1.0,
        behavior_weight_max=stats.weight_max if n else 1.0,
        behavior_masked_fraction=stats.mean(stats.weight_masked),
        behavior_truncated_fraction=stats.mean(stats.weight_truncated),
        behavior_kl=stats.mean(stats.behavior_kl_sum),
        staleness_mean=sum(lags) / len(lags) if lags else 0.0,
        staleness_max=max(lags, default=0),
        grad_norm=outcome.grad_norm if outcome is not None else 0.0,
        duration_s=duration,
        tokens_per_s=num_tokens / duration if duration > 0 else 0.0,
        **summary,
    )
