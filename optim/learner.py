"""The LoRA learner: one synchronous ``step`` from a batch of trajectories to updated weights.

Order of a step (cleanrl-style, top to bottom in ``Learner.step``):

1. group-normalised advantages (zero-variance groups get 0 and are counted);
2. the batch is split into ``updates_per_step`` mini-batches, each into micro-batches of at most
   ``micro_batch_tokens`` computed positions (packed by default);
3. proximal logprobs = the weights when the batch is taken. With one update per batch they equal
   the training pass's own logprobs, detached (same weights, same ops), so no extra forward pass is
   spent; with several updates they are computed up front without grad;
4. per micro-batch: the grammar masks of its members, when the caller gives a mask source (the
   policy, the reference and the entropy are then all taken under the masks the engine sampled
   under); forward with grad, reference logprobs (when the KL is on; ``kl_reference`` says which
   policy: the base model, or the adapter as it was at ``snapshot_reference``), loss normalised by the
   mini-batch's loss-token count, backward (gradients accumulate);
5. gradient clipping, AdamW step, policy version + 1. A step that changes nothing says why
   (``StepMetrics.skip_reason``), so the runtime can release its groups.

``step`` holds a lock, so the runtime may call it from a worker thread while other threads read
``policy_version`` or save the adapter. Deliberately left out: the actor and the queue, and
publishing weights to engines (both in ``envtune.runtime``).
"""

from __future__ import annotations

import contextlib
import enum
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
import torch

from .advantages import group_advantages
from .config import Batching, KlReference, LearnerConfig
from .lora import adapter_state, attach_lora, load_adapter_state, reference_mode, save_adapter
from .lora import trainable_parameters as lora_parameters
from .losses import LossStats, policy_loss
from .packing import (
    ModelBatch,
    build_batch,
    enable_packed_attention,
    plan_microbatches,
    token_logprobs,
    with_masks,
)

log = structlog.get_logger(__name__)

TokenMaskSource = Callable[[int], torch.Tensor | None]
"""Grammar masks of one trajectory, by its index in the batch given to ``Learner.step``: a
[loss tokens, ceil(vocab/32)] int32 tensor in xgrammar's bitmask layout, one row per sampled token in
order (a row of -1 where that token was sampled without a constraint), or None when the whole
trajectory was sampled without one. Called per micro-batch, just before its forward pass, so only one
micro-batch's masks are in memory; ``runtime/recipe/mask_replay.py`` builds them."""


class SkipReason(enum.StrEnum):
    """Why a learner step left the weights and the policy version unchanged."""

    NO_LOSS_TOKENS = "no_loss_tokens"
    """Nothing to train on: no trajectory sampled a token."""
    NON_FINITE_GRAD = "non_finite_grad"
    """The gradient norm was NaN or infinite; the update was skipped to keep the weights intact."""


class TrainingSequence(Protocol):
    """What the learner reads of one finished episode (``envtune.agents.Trajectory`` has it all;
    optim declares only the shape, so it knows nothing of agents or runtime)."""

    @property
    def task_id(self) -> str: ...
    @property
    def group_id(self) -> str: ...
    @property
    def token_ids(self) -> Sequence[int]: ...
    @property
    def loss_mask(self) -> Sequence[bool]: ...
    @property
    def behavior_logprobs(self) -> Sequence[float]: ...
    @property
    def policy_versions(self) -> Sequence[int]: ...
    @property
    def reward(self) -> float: ...
    @property
    def progress(self) -> float: ...
    @property
    def num_model_tokens(self) -> int: ...


@dataclass(frozen=True, slots=True)
class StepMetrics:
    """What one learner step did (means are over loss tokens unless named otherwise)."""

    updated: bool
    """False when nothing was trainable (all dropped or empty) or the gradient was not finite."""
    policy_version: int
    """Policy version after the step."""
    num_trajectories: int
    """Trajectories received."""
    num_trained: int
    """Trajectories that contributed tokens."""
    num_groups: int
    """GRPO groups in the batch."""
    num_zero_variance_groups: int
    """Groups whose rewards were all equal."""
    num_loss_tokens: int
    """Sampled tokens trained on."""
    num_tokens: int
    """All tokens forwarded (prompt, environment and sampled)."""
    masked_token_fraction: float
    """Fraction of forwarded tokens that were masked (prompt and environment tokens)."""
    num_microbatches: int
    """Forward/backward passes with grad."""
    reward_mean: float
    """Mean reward over all trajectories received."""
    reward_std: float
    """Population std of the rewards received."""
    progress_mean: float
    """Mean progress reward R_P over all trajectories received."""
    loss: float
    """Total loss (token mean over the batch, summed over updates)."""
    pg_loss: float
    """Mean weighted clipped policy-gradient term."""
    kl_ref: float
    """Mean k3 KL to the reference policy (0 when the KL is off)."""
    entropy: float
    """Mean entropy of the policy at the sampled positions."""
    clip_fraction: float
    """Fraction of tokens where the PPO clip was active."""
    dual_clip_fraction: float
    """Fraction of tokens where the dual clip was active."""
    behavior_weight_mean: float
    """Mean applied behaviour weight (after truncation/masking)."""
    behavior_weight_min: float
    """Smallest raw behaviour weight."""
    behavior_weight_max: float
    """Largest raw behaviour weight."""
    behavior_masked_fraction: float
    """Fraction of tokens masked by the behaviour weight."""
    behavior_truncated_fraction: float
    """Fraction of tokens whose behaviour weight was truncated."""
    behavior_kl: float
    """Mean k3 estimate of KL(behaviour || proximal): engine/learner mismatch plus staleness."""
    staleness_mean: float
    """Mean (version before the step - token's sampling version) over loss tokens."""
    staleness_max: int
    """Largest such lag."""
    grad_norm: float
    """Global gradient norm before clipping (last update of the step)."""
    lr: float
    """Learning rate used."""
    duration_s: float
    """Wall time of the step."""
    tokens_per_s: float
    """``num_tokens`` trained per second (forwards and backwards, all passes)."""
    # --- issue 10 (optim): new fields ---------------------------------------------------------------
    skip_reason: SkipReason | None = None
    """Why the step did not update (``updated`` is False), None when it did. The runtime must then
    release the batch's groups (they were not trained), or its staleness gate loses their slots."""
    updates_applied: int = 0
    """Optimizer updates applied (< ``updates_per_step`` when a later mini-batch had a non-finite
    gradient: the step still counts as updated, the skipped mini-batch's data was not trained on)."""
    constrained_fraction: float = 0.0
    """Fraction of loss tokens whose logprobs were taken under a grammar mask (over all passes)."""
    # --- end issue 10 --------------------------------------------------------------------------------

    def as_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class _Prepared:
    """One trajectory's per-token training inputs (only the predicted positions)."""

    behavior: list[float]
    advantage: float
    lags: list[int]
    source: int
    """Index of the trajectory in the batch given to ``step`` (for the mask source)."""


class Learner:
    """Off-policy-corrected GRPO on a LoRA adapter; ``step`` is synchronous and thread-safe."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: LearnerConfig = LearnerConfig(),
        *,
        temperature: float = 1.0,
        device: str | None = None,
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (greedy samples cannot be trained), got {temperature}")
        self._config = config
        self._temperature = temperature
        """The rollouts' sampling temperature: logits are divided by it to match behaviour logprobs."""
        self._model = attach_lora(model, config.lora)
        if device is not None:
            self._model.to(device)
        self._device = next(self._model.parameters()).device
        if config.batching is Batching.PACKED:
            self._attention = enable_packed_attention(self._model)
        self._params = lora_parameters(self._model)
        if not self._params:
            raise ValueError("the model has no trainable parameters")
        self._optimizer = torch.optim.AdamW(
            self._params,
            lr=config.lr,
            betas=config.betas,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
        self._lock = threading.Lock()
        self._policy_version = 0
        self._num_steps = 0
        self._reference: list[torch.Tensor] | None = None
        if config.kl_reference is KlReference.STAGE_START:
            self._reference = [p.detach().clone() for p in self._params]

    @property
    def model(self) -> torch.nn.Module:
        """The peft-wrapped policy (do not use it while a step runs)."""
        return self._model

    @property
    def config(self) -> LearnerConfig:
        return self._config

    @property
    def policy_version(self) -> int:
        """Number of weight updates applied so far (0 = the freshly initialised adapter)."""
        return self._policy_version

    @property
    def num_steps(self) -> int:
        """Calls to ``step`` that returned, updated or not."""
        return self._num_steps

    def step(
        self, trajectories: Sequence[TrainingSequence], *, token_masks: TokenMaskSource | None = None
    ) -> StepMetrics:
        """Train on one batch; returns what happened. Raises ValueError on malformed trajectories.

        ``token_masks`` gives the grammar masks the trajectories were sampled under (see
        ``TokenMaskSource``); without it every token counts as sampled unconstrained. A mask that
        does not fit its trajectory raises ValueError before any weight changes (with several updates
        per step, every mask is read by the up-front proximal pass).
        """
        _check_batch(trajectories)
        with self._lock:
            started = time.perf_counter()
            metrics = self._step_locked(trajectories, started, token_masks)
            self._num_steps += 1
        log.info("learner_step", **metrics.as_dict())
        return metrics

    def logprobs(
        self,
        trajectories: Sequence[TrainingSequence],
        *,
        reference: bool = False,
        token_masks: TokenMaskSource | None = None,
    ) -> list[torch.Tensor]:
        """The learner's logprobs of each trajectory's sampled tokens (fp32, on CPU, in order), under
        the current policy or the KL reference, under the grammar masks when given; no gradient.

        What the behaviour logprobs of fresh samples should equal (diagnostics, tests).
        """
        _check_batch(trajectories)
        cfg = self._config
        with self._lock:
            sequences = [t.token_ids for t in trajectories]
            predict = [t.loss_mask for t in trajectories]
            counts = [sum(m[1:]) for m in predict]
            out: list[torch.Tensor | None] = [None] * len(trajectories)
            for micro in plan_microbatches([len(s) for s in sequences], cfg.micro_batch_tokens, cfg.batching):
                batch = build_batch(sequences, predict, micro, cfg.batching, self._device)
                if token_masks is not None:
                    batch = with_masks(batch, [token_masks(i) for i in micro], [counts[i] for i in micro])
                logp = self._logprobs_no_grad(batch, reference=reference).cpu()
                for k, i in enumerate(micro):
                    out[i] = logp[batch.sequence_index.cpu() == k]
        return [x if x is not None else torch.zeros(0) for x in out]

    def snapshot_reference(self) -> bool:
        """Make the current adapter the KL reference (``kl_reference = stage_start``); call it when a
        stage begins. Returns False, changing nothing, under ``kl_reference = base``."""
        if self._config.kl_reference is not KlReference.STAGE_START:
            return False
        with self._lock:
            self._reference = [p.detach().clone() for p in self._params]
        log.info("learner_reference_snapshot", policy_version=self._policy_version)
        return True

    def _step_locked(
        self, trajectories: Sequence[TrainingSequence], started: float, token_masks: TokenMaskSource | None
    ) -> StepMetrics:
        cfg = self._config
        adv = group_advantages(
            [t.reward for t in trajectories], [t.group_id for t in trajectories], cfg.advantages
        )
        version_before = self._policy_version
        chosen = [i for i, t in enumerate(trajectories) if t.num_model_tokens > 0]
        prepared = [self._prepare(trajectories[i], adv.advantages[i], version_before, i) for i in chosen]

        rewards = [t.reward for t in trajectories]
        reward_mean = sum(rewards) / len(rewards)
        summary: dict[str, Any] = {
            "num_trajectories": len(trajectories),
            "num_trained": len(chosen),
            "num_groups": adv.num_groups,
            "num_zero_variance_groups": adv.num_zero_variance_groups,
            "reward_mean": reward_mean,
            "reward_std": math.sqrt(sum((r - reward_mean) ** 2 for r in rewards) / len(rewards)),
            "progress_mean": sum(t.progress for t in trajectories) / len(trajectories),
            "lr": cfg.lr,
        }
        lags = [lag for p in prepared for lag in p.lags]
        num_tokens = sum(len(trajectories[i].token_ids) for i in chosen)
        stats = LossStats.empty()
        total_loss = 0.0
        grad_norm = 0.0
        num_micro = 0
        applied = 0
        constrained = [0, 0]  # [masked loss tokens, loss tokens] over all passes
        skip: SkipReason | None = None if chosen else SkipReason.NO_LOSS_TOKENS

        if chosen:
            sequences = [trajectories[i].token_ids for i in chosen]
            predict = [trajectories[i].loss_mask for i in chosen]
            minibatches = _split(len(chosen), min(cfg.updates_per_step, len(chosen)))
            plans = [
                [
                    [mb[k] for k in micro]
                    for micro in plan_microbatches(
                        [len(sequences[j]) for j in mb], cfg.micro_batch_tokens, cfg.batching
                    )
                ]
                for mb in minibatches
            ]
            batches = [
                [build_batch(sequences, predict, micro, cfg.batching, self._device) for micro in plan]
                for plan in plans
            ]
            proximal: list[list[torch.Tensor]] | None = None
            if len(batches) > 1:
                proximal = [
                    [self._logprobs_no_grad(self._masked(b, prepared, token_masks, constrained)) for b in mb]
                    for mb in batches
                ]
            for u, mb_batches in enumerate(batches):
                loss, mb_stats, grad_norm, n_micro = self._update(
                    mb_batches,
                    prepared,
                    proximal[u] if proximal is not None else None,
                    token_masks,
                    constrained,
                )
                total_loss += loss
                stats = stats.merge(mb_stats)
                num_micro += n_micro
                if not math.isfinite(grad_norm):
                    # A poisoned batch must not corrupt the weights; the update is skipped.
                    log.warning("learner_nonfinite_grad", grad_norm=grad_norm, update=u)
                    break
                applied += 1
            if applied:
                self._policy_version += 1
            else:
                skip = SkipReason.NON_FINITE_GRAD

        duration = time.perf_counter() - started
        n = stats.num_tokens
        return StepMetrics(
            updated=applied > 0,
            skip_reason=skip,
            updates_applied=applied,
            constrained_fraction=constrained[0] / constrained[1] if constrained[1] else 0.0,
            policy_version=self._policy_version,
            num_loss_tokens=n,
            num_tokens=num_tokens,
            masked_token_fraction=1.0 - n / num_tokens if num_tokens else 0.0,
            num_microbatches=num_micro,
            loss=total_loss,
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
            grad_norm=grad_norm,
            duration_s=duration,
            tokens_per_s=num_tokens / duration if duration > 0 else 0.0,
            **summary,
        )

    def _prepare(self, t: TrainingSequence, advantage: float, version: int, source: int) -> _Prepared:
        idx = [j for j in range(1, len(t.token_ids)) if t.loss_mask[j]]
        return _Prepared(
            behavior=[t.behavior_logprobs[j] for j in idx],
            advantage=advantage,
            lags=[version - t.policy_versions[j] for j in idx],
            source=source,
        )

    def _masked(
        self,
        batch: ModelBatch,
        prepared: Sequence[_Prepared],
        token_masks: TokenMaskSource | None,
        counter: list[int],
    ) -> ModelBatch:
        """``batch`` with its members' grammar masks attached (read from the source now)."""
        counter[1] += int(batch.target_ids.numel())
        if token_masks is None:
            return batch
        masks = [token_masks(prepared[m].source) for m in batch.members]
        batch = with_masks(batch, masks, [len(prepared[m].behavior) for m in batch.members])
        if batch.token_masks is not None:
            counter[0] += int((batch.token_masks != -1).any(-1).sum())
        return batch

    @contextlib.contextmanager
    def _reference_weights(self) -> Iterator[None]:
        """Inside, the model computes the KL reference policy (see ``KlReference``)."""
        if self._reference is None:
            with reference_mode(self._model):
                yield
            return
        # Swap the snapshot's storage in (no copy), and back even if the forward fails.
        current = [p.data for p in self._params]
        for p, ref in zip(self._params, self._reference, strict=True):
            p.data = ref
        try:
            yield
        finally:
            for p, data in zip(self._params, current, strict=True):
                p.data = data

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        if self._config.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self._device.type, dtype=getattr(torch, self._config.autocast_dtype))

    def _logprobs_no_grad(self, batch: ModelBatch, *, reference: bool = False) -> torch.Tensor:
        self._model.eval()
        ref = self._reference_weights() if reference else contextlib.nullcontext()
        with torch.no_grad(), ref, self._autocast():
            logp, _ = token_logprobs(
                self._model,
                batch,
                temperature=self._temperature,
                logits_chunk_elements=self._config.logits_chunk_elements,
            )
        return logp

    def _update(
        self,
        batches: Sequence[ModelBatch],
        prepared: Sequence[_Prepared],
        proximal: Sequence[torch.Tensor] | None,
        token_masks: TokenMaskSource | None,
        constrained: list[int],
    ) -> tuple[float, LossStats, float, int]:
        """One optimizer update over ``batches`` (micro-batches of one mini-batch)."""
        cfg = self._config
        n_global = sum(int(b.target_ids.numel()) for b in batches)
        stats = LossStats.empty()
        total = 0.0
        self._optimizer.zero_grad(set_to_none=True)
        for k, batch in enumerate(batches):
            batch = self._masked(batch, prepared, token_masks, constrained)
            behavior = torch.tensor(
                [x for m in batch.members for x in prepared[m].behavior],
                dtype=torch.float32,
                device=self._device,
            )
            advantages = torch.tensor(
                [prepared[m].advantage for m in batch.members for _ in prepared[m].behavior],
                dtype=torch.float32,
                device=self._device,
            )
            ref = self._logprobs_no_grad(batch, reference=True) if cfg.loss.kl_coef > 0 else None
            self._model.train()
            with self._autocast():
                logp, entropy = token_logprobs(
                    self._model,
                    batch,
                    temperature=self._temperature,
                    with_entropy=True,
                    logits_chunk_elements=cfg.logits_chunk_elements,
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
            loss.backward()
            total += float(loss.detach())
            stats = stats.merge(mb_stats)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params, cfg.grad_clip))
        if math.isfinite(grad_norm):
            self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        return total, stats, grad_norm, len(batches)

    def save_adapter(self, folder: Path) -> int:
        """Write the current adapter (peft layout) into ``folder``; returns its policy version.

        Waits for a running step, so the folder and the version always match.
        """
        with self._lock:
            save_adapter(self._model, folder)
            return self._policy_version

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: adapter, optimizer, counters, torch RNG."""
        with self._lock:
            state = {
                "adapter": adapter_state(self._model),
                "optimizer": self._optimizer.state_dict(),
                "policy_version": self._policy_version,
                "num_steps": self._num_steps,
                "torch_rng": torch.get_rng_state(),
            }
            if self._reference is not None:
                state["reference"] = [r.cpu().clone() for r in self._reference]
            return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (same model shape and config)."""
        reference = None
        if self._reference is not None:
            if "reference" not in state:
                raise ValueError("the state has no KL reference snapshot (saved with kl_reference=base?)")
            reference = state["reference"]
            if [tuple(r.shape) for r in reference] != [tuple(p.shape) for p in self._params]:
                raise ValueError("the state's KL reference does not fit this adapter")
        with self._lock:
            load_adapter_state(self._model, state["adapter"])
            self._optimizer.load_state_dict(state["optimizer"])
            self._policy_version = int(state["policy_version"])
            self._num_steps = int(state["num_steps"])
            torch.set_rng_state(state["torch_rng"])
            if reference is not None:
                pairs = zip(reference, self._params, strict=True)
                self._reference = [r.to(p.device, p.dtype) for r, p in pairs]


def _check_batch(trajectories: Sequence[TrainingSequence]) -> None:
    if not trajectories:
        raise ValueError("step needs at least one trajectory")
    for t in trajectories:
        if t.loss_mask and t.loss_mask[0]:
            raise ValueError(f"trajectory {t.task_id}/{t.group_id}: token 0 cannot be a loss token")


def _split(n: int, parts: int) -> list[list[int]]:
    """``range(n)`` in ``parts`` contiguous, nearly equal chunks."""
    base, extra = divmod(n, parts)
    out: list[list[int]] = []
    start = 0
    for p in range(parts):
        size = base + (1 if p < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out
