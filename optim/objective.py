"""One micro-batch of the learning rule, shared by both learners.

``Learner`` (one process) and ``ShardedCore`` (each FSDP2 rank of ``distributed.py``) call the same
``PolicyObjective``, so the log-probabilities (chunked over tokens, under the grammar masks a batch
carries), the KL reference and the loss cannot drift apart between them. Per micro-batch:

- ``logprobs(batch, reference=...)``: the targets' logprobs without grad, under the current policy
  or the KL reference (the proximal pass of several updates per step, the KL's reference term);
- ``loss(batch, behavior, advantages, num_tokens=..., proximal=...)``: the reference logprobs (when
  the KL is on), the forward with grad and entropy, and the clipped off-policy loss summed over the
  micro-batch's tokens and divided by ``num_tokens`` (the mini-batch's loss tokens: over all ranks
  when sharded). The caller runs ``backward`` (the sharded learner scales it first).

``TokenLogprobModel`` makes the log-probabilities the forward of one module, the FSDP2 root on the
sharded path. ``ReferencePolicy`` is the KL anchor (``LearnerConfig.kl_reference``): the base model (adapter
disabled) or a snapshot of the adapter, copied into the live parameters for the reference forward
and back, in place (under FSDP2 each rank copies its own shards, the storage FSDP gathers from; a
``.data`` swap would be invisible to it). The sharded learner passes ``reshard``: FSDP units kept
gathered after a forward (the root, or every unit with ``reshard_after_forward = false``) are
released around the swap, so the next forward gathers the weights actually in place.

Also here: ``prepare_model`` (LoRA, gradient checkpointing, packed attention: the same on every
path) and ``per_token`` (a micro-batch's behaviour logprobs and advantages as tensors).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from peft import PeftModel

from .config import Batching, KlReference, LearnerConfig
from .lora import attach_lora, reference_mode
from .losses import LossStats, policy_loss
from .packing import ModelBatch, enable_packed_attention, token_logprobs


def prepare_model(model: torch.nn.Module, config: LearnerConfig) -> PeftModel:
    """The peft model a learner trains: LoRA attached, checkpointing and packed attention switched on
    as ``config`` says (before any sharding: FSDP2 wraps the result)."""
    peft_model = attach_lora(model, config.lora)
    if config.gradient_checkpointing:
        enable_checkpointing(peft_model.get_base_model())
    if config.batching is Batching.PACKED:
        enable_packed_attention(peft_model)
    return peft_model


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant per-layer checkpointing (transformers >= 5.24 renamed the method). Non-reentrant
    needs no ``requires_grad`` on the inputs (the frozen embeddings give none) and recomputes the
    same ops, so results are bit-identical to running without it."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]


def per_token(
    behavior: Sequence[Sequence[float]], advantages: Sequence[float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Members' behaviour logprobs (predicted positions only) and their advantages, one per token."""
    flat = [x for member in behavior for x in member]
    spread = [a for member, a in zip(behavior, advantages, strict=True) for _ in member]
    return (
        torch.tensor(flat, dtype=torch.float32, device=device),
        torch.tensor(spread, dtype=torch.float32, device=device),
    )


class ReferencePolicy:
    """The KL reference (see the module docstring). Use from one thread at a time."""

    def __init__(
        self,
        model: PeftModel,
        params: Sequence[torch.Tensor],
        kind: KlReference,
        *,
        reshard: Callable[[], None] | None = None,
    ) -> None:
        self._model = model
        self._params = list(params)
        self.kind = kind
        self._reshard = reshard
        self._snapshot: list[torch.Tensor] | None = None
        self._scratch: list[torch.Tensor] | None = None
        if kind is KlReference.STAGE_START:
            self.snapshot()

    @property
    def tensors(self) -> list[torch.Tensor] | None:
        """The snapshot (this process's shards when sharded), None under ``base``."""
        return self._snapshot

    def snapshot(self) -> bool:
        """Make the adapter as it is now the reference; False (nothing changes) under ``base``."""
        if self.kind is not KlReference.STAGE_START:
            return False
        with torch.no_grad():
            self._snapshot = [p.detach().clone() for p in self._params]
        return True

    def load(self, tensors: Sequence[torch.Tensor]) -> None:
        """Take ``tensors`` (shaped like the parameters) as the snapshot."""
        if self.kind is not KlReference.STAGE_START:
            raise ValueError("the KL reference is the base model: there is no snapshot to load")
        if [tuple(t.shape) for t in tensors] != [tuple(p.shape) for p in self._params]:
            raise ValueError("the KL reference snapshot does not fit this adapter")
        with torch.no_grad():
            self._snapshot = [
                t.detach().to(device=p.device, dtype=p.dtype).clone()
                for t, p in zip(tensors, self._params, strict=True)
            ]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside, the model computes the reference policy (no grad must be needed inside)."""
        if self._snapshot is None:
            with reference_mode(self._model):
                yield
            return
        with torch.no_grad():
            if self._reshard is not None:
                self._reshard()
            if self._scratch is None:
                self._scratch = [p.detach().clone() for p in self._params]
            else:
                for s, p in zip(self._scratch, self._params, strict=True):
                    s.copy_(p.detach())
            for p, r in zip(self._params, self._snapshot, strict=True):
                p.copy_(r)
        try:
            yield
        finally:
            with torch.no_grad():
                if self._reshard is not None:
                    self._reshard()
                for p, s in zip(self._params, self._scratch, strict=True):
                    p.copy_(s)


class TokenLogprobModel(torch.nn.Module):
    """The peft model with ``packing.token_logprobs`` as its forward.

    Under FSDP2 this module is the root unit: the decoder, the LM head and the chunked log-softmax
    (which reads the head's weight directly, outside the causal LM's own forward) then all run
    inside the root's forward, while its weights are gathered, and the chunks' backward runs before
    the root releases them.
    """

    def __init__(self, model: PeftModel, *, temperature: float, logits_chunk_elements: int) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (greedy samples cannot be trained), got {temperature}")
        self.model = model
        self.temperature = temperature
        """The rollouts' sampling temperature: logits are divided by it to match behaviour logprobs."""
        self.logits_chunk_elements = logits_chunk_elements

    def forward(self, batch: ModelBatch, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        logp, entropy = token_logprobs(
            self.model,
            batch,
            temperature=self.temperature,
            with_entropy=with_entropy,
            logits_chunk_elements=self.logits_chunk_elements,
        )
        # Fresh tensors, not views: FSDP2 hooks the root's outputs for its backward, and a view
        # would lose the hook to any later in-place op (N floats each: nothing to save by aliasing).
        return logp.clone(), entropy.clone() if entropy is not None else None


class PolicyObjective:
    """A learner's policy evaluation and loss on one micro-batch (see the module docstring)."""

    def __init__(
        self,
        policy: TokenLogprobModel,
        config: LearnerConfig,
        *,
        device: torch.device,
        reference: ReferencePolicy,
    ) -> None:
        self.policy = policy
        self.config = config
        self.device = device
        self.reference = reference

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.config.autocast_dtype))

    def _forward(self, batch: ModelBatch, *, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self.autocast():
            logp, entropy = self.policy(batch, with_entropy)
        return logp, entropy

    def logprobs(self, batch: ModelBatch, *, reference: bool = False) -> torch.Tensor:
        """The targets' logprobs under the policy (or the KL reference), no grad, fp32."""
        self.policy.eval()
        ref = self.reference.active() if reference else contextlib.nullcontext()
        with torch.no_grad(), ref:
            logp, _ = self._forward(batch, with_entropy=False)
        return logp

    def loss(
        self,
        batch: ModelBatch,
        behavior: torch.Tensor,
        advantages: torch.Tensor,
        *,
        num_tokens: int,
        proximal: torch.Tensor | None,
    ) -> tuple[torch.Tensor, LossStats]:
        """The micro-batch's share of the mini-batch loss (sum over its tokens / ``num_tokens``).

        ``proximal`` None: one update per step, so the proximal policy is this pass's own logprobs.
        """
        cfg = self.config.loss
        ref = self.logprobs(batch, reference=True) if cfg.kl_coef > 0 else None
        self.policy.train()
        logp, entropy = self._forward(batch, with_entropy=True)
        if entropy is not None and cfg.entropy_coef == 0:
            entropy = entropy.detach()
        return policy_loss(
            logp,
            proximal if proximal is not None else logp.detach(),
            behavior,
            advantages,
            torch.ones_like(behavior, dtype=torch.bool),
            num_tokens=num_tokens,
            config=cfg,
            sequence_index=batch.sequence_index,
            entropy=entropy,
            ref_logprobs=ref,
        )
