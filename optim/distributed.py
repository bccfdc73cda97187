"""The LoRA learner sharded over torch.distributed ranks with FSDP2 (``fully_shard``).

Process layout under ``torchrun`` (``envtune-run`` does this when it finds itself launched so):
rank 0 runs the asyncio runtime and holds a ``ShardedLearner``, which has the single-process
``Learner``'s surface (``step`` with grammar masks, ``snapshot_reference``, ``save_adapter``,
``state_dict``, ``load_state_dict``, ``policy_version``). Every other rank builds the same
``ShardedCore`` and calls ``serve_worker``: it waits for rank 0's commands on a gloo control group
and runs its part of each collective. Rank 0 scatters one message per rank; a step's message holds
that rank's share of each mini-batch, so ranks train on different (uneven) token counts.

Building a core (every rank, same order): LoRA is attached first (seeded, then rank 0's initial
adapter is broadcast so every rank starts identical), gradient checkpointing and packed attention
are switched on (``objective.prepare_model``, as the single-process learner does), ``fully_shard``
wraps each decoder layer and then the root, with bf16 parameters and fp32 gradient reduction on GPU
(fp32 throughout on CPU), and the optimizer is built last, on the sharded parameters (an optimizer
built before sharding holds stale tensors and silently never updates).

A step (``ShardedCore.run_step``), identical in arithmetic to ``Learner.step`` on the whole batch:
rank 0 computes the group advantages over the full batch and splits each mini-batch across ranks
(longest sequence to the least-loaded rank). Every rank all-gathers its loss-token count and
micro-batch count; the loss is normalised by the *global* loss-token count and multiplied by the
world size, because FSDP2 averages gradients over ranks (per-rank means would weight a rank's
tokens by how few it holds). Ranks with fewer micro-batches run zero-weight dummy ones: FSDP's
all-gathers and reduce-scatters must happen the same number of times on every rank. Clipping uses
the global norm, so every rank takes (or skips) the same update. Each micro-batch's loss is
``objective.PolicyObjective.loss``, the code the single-process learner runs: chunked
log-probabilities, grammar masks and the KL reference are the same on both paths.

Grammar masks: the caller's mask source lives on rank 0 only. Just before each micro-batch pass
(the proximal pass and the update pass alike) rank 0 reads the masks of every rank's micro-batch at
that position, checks them against the sampled tokens, and scatters them: each rank holds one
micro-batch's masks at a time, rank 0 briefly one per rank. A mask that does not fit is refused on
every rank at the same point (``StepAborted``: the workers keep serving, rank 0 raises ValueError),
before the optimizer steps when it is read by the first pass.

KL reference (``kl_reference = stage_start``): each rank snapshots its own shards of the adapter;
checkpoints gather the snapshot like the adapter.

Publishing (``save_adapter``) gathers only the LoRA tensors (``full_tensor()``), on every rank in
the same order; rank 0 writes ``adapter_model.safetensors`` + ``adapter_config.json`` to a temporary
folder beside the target and renames it into place. Checkpoints use torch.distributed.checkpoint's
state-dict helpers with full (gathered, CPU) state on rank 0, so a run can resume on another number
of ranks; loading broadcasts from rank 0.

Failure model: a command that raises on one rank leaves the others in a collective; torchrun then
tears the job down (its agent stops all ranks when one exits). Rank 0 validates every batch before
sending it, so malformed input raises there and never reaches the workers.

Deliberately left out: HSDP (2-D meshes), CPU offload, sharding across the inference GPUs.
``benchmarks/fsdp_equivalence.py`` (run by the tests) fails when the two learners drift apart.
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
from typing import Any

import structlog
import torch
import torch.distributed as dist

from .advantages import group_advantages
from .config import KlReference, LearnerConfig
from .learner import SkipReason, StepMetrics, TokenMaskSource, TrainingSequence, _split
from .logprobs import check_masks
from .lora import trainable_parameters as lora_parameters
from .losses import LossStats
from .objective import PolicyObjective, ReferencePolicy, TokenLogprobModel, per_token, prepare_model
from .packing import ModelBatch, build_batch, plan_microbatches, with_masks

log = structlog.get_logger(__name__)

SHARDED_STATE_FORMAT = "envtune-sharded-learner-v1"
"""Marks a ``ShardedLearner.state_dict``; the single-process learner's state has no such key."""


class StepAborted(ValueError):
    """A step refused on every rank at the same point (a grammar mask that does not fit its tokens)."""


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


def control_group(config: LearnerConfig) -> Any:
    """A gloo group for rank 0's commands (small objects on CPU, whatever the training backend);
    its timeout is how long the workers wait for the next command. Collective: every rank calls it."""
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=config.distributed.control_timeout_s))


# --- messages ---------------------------------------------------------------------------------------


class Command(enum.StrEnum):
    """What rank 0 asks every rank to do."""

    STEP = "step"
    SAVE_ADAPTER = "save_adapter"
    SNAPSHOT_REFERENCE = "snapshot_reference"
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
    source: int
    """Index of the trajectory in the batch given to ``ShardedLearner.step`` (for the mask source)."""


@dataclass(frozen=True, slots=True)
class _StepPlan:
    """A STEP command: this rank's items per mini-batch, and whether grammar masks will follow."""

    updates: tuple[tuple[_Item, ...], ...]
    masked: bool


@dataclass(frozen=True, slots=True)
class _Message:
    command: Command
    payload: Any = None
    """STEP: a ``_StepPlan``; LOAD_STATE_DICT: the state (rank 0) and the counters."""


@dataclass(frozen=True, slots=True)
class _StepOutcome:
    """Global results of a step, the same on every rank."""

    loss: float
    stats: LossStats
    grad_norm: float
    num_microbatches: int
    applied: int
    constrained: tuple[int, int]
    """(loss tokens under a grammar mask, loss tokens) over all passes."""


class _MaskFeed:
    """Rank 0's view of a masked step: every rank's micro-batches and the caller's mask source."""

    def __init__(
        self,
        source: TokenMaskSource,
        plans: Sequence[Sequence[tuple[_Item, ...]]],
        groups: Sequence[Sequence[Sequence[list[int]]]],
        vocab_size: int,
    ) -> None:
        self.source = source
        self.plans = plans
        """[rank][update] -> that rank's items."""
        self.groups = groups
        """[rank][update][micro-batch] -> indices into those items."""
        self.vocab_size = vocab_size

    def masks_for(self, rank: int, update: int, micro: int) -> list[torch.Tensor | None] | str | None:
        """Rank ``rank``'s masks for its micro-batch ``micro`` of ``update`` (None: a padding pass),
        or the error that aborts the step."""
        groups = self.groups[rank][update]
        if micro >= len(groups):
            return None
        items = self.plans[rank][update]
        out: list[torch.Tensor | None] = []
        for j in groups[micro]:
            item = items[j]
            mask = self.source(item.source)
            if mask is not None:
                targets = torch.tensor(
                    [x for x, m in zip(item.token_ids[1:], item.loss_mask[1:], strict=True) if m],
                    dtype=torch.int64,
                )
                try:
                    if mask.dtype != torch.int32 or mask.dim() != 2 or mask.shape[0] != targets.numel():
                        shape = f"{tuple(mask.shape)} {mask.dtype}"
                        raise ValueError(f"{shape} mask rows for {targets.numel()} predicted tokens")
                    check_masks(mask.cpu(), targets, self.vocab_size)
                except ValueError as exc:
                    return f"trajectory {item.source}: {exc}"
                mask = mask.cpu()
            out.append(mask)
        return out


# --- the per-rank learner ----------------------------------------------------------------------------


class ShardedCore:
    """The sharded model and optimizer of one rank; every method is a collective over all ranks."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: LearnerConfig,
        *,
        context: DistributedContext,
        temperature: float = 1.0,
        control: Any = None,
    ) -> None:
        """``control``: the gloo group of ``control_group`` when the caller made one already (every
        rank must create groups in the same order), else a new one."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (greedy samples cannot be trained), got {temperature}")
        self.config = config
        self.temperature = temperature
        self.context = context
        self.device = context.device
        self.control = control if control is not None else control_group(config)
        on_gpu = self.device.type == "cuda"
        self.model = prepare_model(model, config)
        base: Any = self.model.get_base_model()
        self.vocab_size = int(base.get_output_embeddings().out_features)
        self._broadcast_lora()
        self.policy = TokenLogprobModel(
            self.model, temperature=temperature, logits_chunk_elements=config.logits_chunk_elements
        )
        """The FSDP root (see ``TokenLogprobModel``); ``model`` is the peft model inside it."""
        mesh = init_device_mesh(self.device.type, (context.world_size,))
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if on_gpu and config.distributed.mixed_precision
            else MixedPrecisionPolicy()
        )
        layers = _decoder_layers(self.model)
        if not layers:
            raise ValueError("found no decoder layers (_no_split_modules) to shard")
        reshard = config.distributed.reshard_after_forward
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        fully_shard(self.policy, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
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
        self.reference = ReferencePolicy(self.model, self.params, config.kl_reference, reshard=self._reshard)
        self.objective = PolicyObjective(self.policy, config, device=self.device, reference=self.reference)
        self.policy_version = 0
        self.num_steps = 0
        self._dummy: ModelBatch | None = None
        self.mask_feed: _MaskFeed | None = None
        """Rank 0, during a masked step: where the masks come from."""

    # --- set-up -------------------------------------------------------------------------------------

    def _broadcast_lora(self) -> None:
        """Every rank starts from rank 0's adapter (peft draws LoRA A from each rank's own RNG)."""
        for p in lora_parameters(self.model):
            buffer = p.detach().to("cpu", copy=True)
            dist.broadcast(buffer, src=0, group=self.control)
            with torch.no_grad():
                p.copy_(buffer.to(p.device))

    def _reshard(self) -> None:
        """Release every gathered FSDP unit (the weights in the shards are then what the next forward
        gathers)."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.policy.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

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
                case Command.SNAPSHOT_REFERENCE:
                    return self.reference.snapshot()
                case Command.STATE_DICT:
                    return self.gather_state()
                case Command.LOAD_STATE_DICT:
                    return self.load_state(message.payload)
                case _:
                    raise ValueError(f"unexpected command {message.command!r}")

    # --- a step ---------------------------------------------------------------------------------------

    def microbatch_groups(self, items: Sequence[_Item]) -> list[list[int]]:
        """How a rank splits its items into micro-batches (rank 0 computes every rank's plan too)."""
        cfg = self.config
        return plan_microbatches([len(it.token_ids) for it in items], cfg.micro_batch_tokens, cfg.batching)

    def run_step(self, plan: _StepPlan) -> _StepOutcome:
        """Train this rank's share of each mini-batch; collective (see the module docstring)."""
        world = self.context.world_size
        updates = plan.updates
        plans = [self._microbatches(items) for items in updates]
        local = torch.tensor(
            [
                [sum(len(it.behavior) for it in items), len(p)]
                for items, p in zip(updates, plans, strict=True)
            ],
            dtype=torch.int64,
        ).reshape(len(updates), 2)
        gathered = [torch.zeros_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=self.control)
        table = torch.stack(gathered)  # [rank, update, (loss tokens, micro-batches)]
        n_global = self._loss_normalizer(table)
        n_micro = table[:, :, 1].max(0).values.tolist()
        padded = [
            p + [(self._dummy_batch(), ())] * (n - len(p)) for p, n in zip(plans, n_micro, strict=True)
        ]
        constrained = [0, 0]
        proximal = None
        if len(padded) > 1:
            proximal = [
                [
                    self.objective.logprobs(self._masked(batch, items, u, k, plan.masked, constrained))
                    for k, (batch, items) in enumerate(p)
                ]
                for u, p in enumerate(padded)
            ]
        stats = LossStats.empty()
        total = 0.0
        grad_norm = 0.0
        applied = 0
        for u, p in enumerate(padded):
            if n_global[u] == 0:
                raise ValueError(f"mini-batch {u} has no loss tokens on any rank")
            loss, mb_stats, grad_norm = self._update(
                u, p, n_global[u], proximal[u] if proximal else None, world, plan.masked, constrained
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
        dist.all_gather_object(parts, (total, stats, real, tuple(constrained)), group=self.control)
        merged = LossStats.empty()
        for part in parts:
            merged = merged.merge(part[1])
        if applied:
            self.policy_version += 1
        self.num_steps += 1
        return _StepOutcome(
            loss=sum(part[0] for part in parts),
            stats=merged,
            grad_norm=grad_norm,
            num_microbatches=sum(part[2] for part in parts),
            applied=applied,
            constrained=(sum(part[3][0] for part in parts), sum(part[3][1] for part in parts)),
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
        return [
            (build_batch(sequences, masks, group, cfg.batching, self.device), tuple(items[k] for k in group))
            for group in self.microbatch_groups(items)
        ]

    def _masked(
        self,
        batch: ModelBatch,
        items: tuple[_Item, ...],
        update: int,
        micro: int,
        masked: bool,
        counter: list[int],
    ) -> ModelBatch:
        """``batch`` with its grammar masks, scattered by rank 0 (a collective when ``masked``)."""
        counter[1] += sum(len(it.behavior) for it in items)
        if not masked:
            return batch
        feed = self.mask_feed
        out: list[Any] = [None]
        outgoing = None
        if self.context.rank == 0:
            assert feed is not None, "a masked step on rank 0 needs its mask feed"
            outgoing = [feed.masks_for(r, update, micro) for r in range(self.context.world_size)]
            errors = [m for m in outgoing if isinstance(m, str)]
            if errors:
                outgoing = [errors[0]] * self.context.world_size
        dist.scatter_object_list(out, outgoing, src=0, group=self.control)
        masks = out[0]
        if isinstance(masks, str):
            raise StepAborted(masks)
        if masks is None or not items:
            return batch
        batch = with_masks(batch, masks, [len(it.behavior) for it in items])
        if batch.token_masks is not None:
            counter[0] += int((batch.token_masks != -1).any(-1).sum())
        return batch

    def _dummy_batch(self) -> ModelBatch:
        """Two tokens, one predicted: the smallest pass that runs every FSDP collective."""
        if self._dummy is None:
            self._dummy = build_batch([[0, 0]], [[False, True]], [0], self.config.batching, self.device)
        return self._dummy

    def _update(
        self,
        update: int,
        plan: Sequence[tuple[ModelBatch, tuple[_Item, ...]]],
        n_global: int,
        proximal: Sequence[torch.Tensor] | None,
        world: int,
        masked: bool,
        constrained: list[int],
    ) -> tuple[float, LossStats, float]:
        """One optimizer update over this rank's micro-batches of a mini-batch (as ``Learner._update``)."""
        from torch.distributed.tensor import DTensor

        cfg = self.config
        stats = LossStats.empty()
        total = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        for k, (raw, items) in enumerate(plan):
            batch = self._masked(raw, items, update, k, masked, constrained)
            dummy = not items
            if dummy:
                behavior = torch.zeros(1, dtype=torch.float32, device=self.device)
                advantages = torch.zeros(1, dtype=torch.float32, device=self.device)
            else:
                behavior, advantages = per_token(
                    [it.behavior for it in items], [it.advantage for it in items], self.device
                )
            loss, mb_stats = self.objective.loss(
                batch,
                behavior,
                advantages,
                num_tokens=n_global,
                proximal=proximal[k] if proximal is not None else None,
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
        for key, value in get_peft_model_state_dict(self.model, save_embedding_layers=False).items():
            tensor = value.full_tensor() if isinstance(value, DTensor) else value
            if self.context.rank == 0:
                full[key] = tensor.detach().to("cpu", copy=True).contiguous()
        return full if self.context.rank == 0 else None

    def gather_state(self) -> dict[str, Any] | None:
        """Adapter, optimizer and KL reference state, gathered to rank 0 on CPU (None elsewhere)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        model_state = get_model_state_dict(self.model, options=options)
        optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        reference = None
        if self.reference.tensors is not None:
            with self.reference.active():  # the snapshot in the parameters, gathered like them
                # Copied inside: on one CPU rank the "gathered" tensors are the live parameters.
                reference = _detached_copy(get_model_state_dict(self.model, options=options))
        if self.context.rank != 0:
            return None
        state = {
            "format": SHARDED_STATE_FORMAT,
            # Copies: on one CPU rank the "gathered" tensors can be the live parameters themselves.
            "adapter": _detached_copy(model_state),
            "optimizer": _detached_copy(optim_state),
            "policy_version": self.policy_version,
            "num_steps": self.num_steps,
            "world_size": self.context.world_size,
            "torch_rng": torch.get_rng_state(),
        }
        if reference is not None:
            state["reference"] = reference
        return state

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

        def load_adapter(tensors: dict[str, Any]) -> None:
            result = set_model_state_dict(self.model, tensors, options=options)
            missing = [k for k in result.missing_keys if "lora_" in k]
            if is_zero and (missing or result.unexpected_keys):
                raise ValueError(
                    f"learner state does not fit the model: missing {missing[:3]}, "
                    f"unexpected {result.unexpected_keys[:3]}"
                )

        if self.reference.kind is KlReference.STAGE_START:
            # The snapshot goes through the parameters (broadcast and sharded like them), then the adapter.
            load_adapter(state["reference"] if state is not None else {})
            self.reference.snapshot()
        load_adapter(state["adapter"] if state is not None else {})
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
        self._broken = False

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

    def _broadcast(self, messages: Sequence[_Message]) -> Any:
        if self._closed:
            raise RuntimeError("the sharded learner is closed")
        own = self._core.receive(messages)
        try:
            return self._core.execute(own)
        except StepAborted:
            raise  # every rank refused at the same point: still in step
        except BaseException:
            # The other ranks may be inside a collective this rank left: no more commands.
            self._broken = True
            raise

    def step(
        self, trajectories: Sequence[TrainingSequence], *, token_masks: TokenMaskSource | None = None
    ) -> StepMetrics:
        """Train on one batch across all ranks; raises ValueError on malformed input (nothing is sent).

        ``token_masks`` as for ``Learner.step``; it is called on rank 0 only, one micro-batch at a
        time. A mask that does not fit raises ValueError on rank 0 (``StepAborted``) and is skipped
        by the workers, which keep serving.
        """
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
                masked = token_masks is not None
                if token_masks is not None:
                    core = self._core
                    groups = [[core.microbatch_groups(items) for items in rank] for rank in plan]
                    core.mask_feed = _MaskFeed(token_masks, plan, groups, core.vocab_size)
                try:
                    outcome = self._broadcast(
                        [
                            _Message(Command.STEP, _StepPlan(tuple(plan[r]), masked))
                            for r in range(self.world_size)
                        ]
                    )
                finally:
                    self._core.mask_feed = None
            metrics = _metrics(outcome, summary, lags, num_tokens, self.policy_version, started)
        log.info("learner_step", world_size=self.world_size, **metrics.as_dict())
        return metrics

    def _plan(
        self, trajectories: Sequence[TrainingSequence]
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
                    source=i,
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

    def snapshot_reference(self) -> bool:
        """Make the current adapter the KL reference on every rank (``Learner.snapshot_reference``)."""
        if self.config.kl_reference is not KlReference.STAGE_START:
            return False
        with self._lock:
            self._broadcast([_Message(Command.SNAPSHOT_REFERENCE)] * self.world_size)
        log.info("learner_reference_snapshot", policy_version=self.policy_version)
        return True

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
                "resume it with the learner that wrote it (a single process: no torchrun)"
            )
        if self.config.kl_reference is KlReference.STAGE_START and "reference" not in state:
            raise ValueError("the state has no KL reference snapshot (saved with kl_reference=base?)")
        with self._lock:
            counters = (int(state["policy_version"]), int(state["num_steps"]))
            messages = [_Message(Command.LOAD_STATE_DICT, (None, *counters))] * self.world_size
            messages[0] = _Message(Command.LOAD_STATE_DICT, (state, *counters))
            self._broadcast(messages)

    def close(self) -> None:
        """Release the workers (their ``serve_worker`` returns). Idempotent. After a command failed on
        this rank the workers may be stuck in a collective: nothing is sent, and torchrun stops them
        when this process exits."""
        with self._lock:
            if self._broken and not self._closed:
                log.warning("sharded_learner_not_released", reason="a command failed on rank 0")
            elif not self._closed:
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
            with contextlib.suppress(StepAborted):  # refused on every rank alike; rank 0 reports it
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
    applied = outcome.applied if outcome is not None else 0
    masked, counted = outcome.constrained if outcome is not None else (0, 0)
    skip = None
    if outcome is None:
        skip = SkipReason.NO_LOSS_TOKENS
    elif not applied:
        skip = SkipReason.NON_FINITE_GRAD
    return StepMetrics(
        updated=applied > 0,
        skip_reason=skip,
        updates_applied=applied,
        constrained_fraction=masked / counted if counted else 0.0,
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
