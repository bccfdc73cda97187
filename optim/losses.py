"""The off-policy-corrected clipped policy-gradient loss, on flat packed token tensors.

Three logprob streams per sampled token (AReaL's decoupled PPO):

- ``logprobs``: the policy being trained (carries the gradient);
- ``proximal_logprobs``: the learner's weights when the batch was taken (constant);
- ``behavior_logprobs``: what the engine reported when it sampled the token (constant; possibly
  several policy versions old, and from a different numeric stack even when fresh).

The PPO ratio is taken against the proximal policy and clipped (asymmetric, optional dual clip);
the result is multiplied by the behaviour weight proximal/behaviour, truncated at a cap or masked
outside a range, per token or per sequence (geometric mean). Optional k3 KL to a reference policy
and an entropy bonus. Aggregation is a token mean over the *global* batch: the caller passes the
number of loss tokens in the whole batch, so summing micro-batch losses gives the exact mean.

Deliberately left out: the forward pass, packing and optimisation (see ``learner.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .config import LossConfig, WeightLevel, WeightMode


@dataclass(frozen=True, slots=True)
class LossStats:
    """Sums and extremes over the loss tokens of one call; ``merge`` combines micro-batches."""

    num_tokens: int
    """Loss tokens (sampled tokens) seen."""
    pg_loss_sum: float
    """Sum of the weighted clipped policy-gradient term."""
    kl_ref_sum: float
    """Sum of the k3 KL to the reference (0 when no reference was given)."""
    entropy_sum: float
    """Sum of the per-token entropy (0 when none was given)."""
    clipped: int
    """Tokens where the PPO clip was active."""
    dual_clipped: int
    """Tokens where the dual clip was active."""
    weight_sum: float
    """Sum of the behaviour weights after truncation/masking."""
    weight_min: float
    """Smallest raw behaviour weight (+inf when no token)."""
    weight_max: float
    """Largest raw behaviour weight (-inf when no token)."""
    weight_masked: int
    """Tokens whose policy-gradient term was masked by the behaviour weight."""
    weight_truncated: int
    """Tokens whose behaviour weight was truncated at the cap."""
    behavior_kl_sum: float
    """Sum of the k3 estimate of KL(behaviour || proximal) per token."""

    @staticmethod
    def empty() -> LossStats:
        return LossStats(0, 0.0, 0.0, 0.0, 0, 0, 0.0, math.inf, -math.inf, 0, 0, 0.0)

    def merge(self, other: LossStats) -> LossStats:
        values = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "weight_min":
                values[f.name] = min(a, b)
            elif f.name == "weight_max":
                values[f.name] = max(a, b)
            else:
                values[f.name] = a + b
        return LossStats(**values)

    def mean(self, total: float) -> float:
        """``total / num_tokens`` (0 when there is no token)."""
        return total / self.num_tokens if self.num_tokens else 0.0


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π || π_ref) from samples of π (verl's ``low_var_kl``, same clamps)."""
    log_ratio = torch.clamp(ref_logp - logp, -20.0, 20.0)
    return torch.clamp(torch.exp(log_ratio) - log_ratio - 1.0, -10.0, 10.0)


def behavior_weights(
    proximal_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    sequence_index: torch.Tensor | None,
    config: LossConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw weights, applied weights, masked flags and truncated flags, per token (all without grad)."""
    log_w = torch.clamp(proximal_logprobs - behavior_logprobs, -20.0, 20.0) * loss_mask
    if config.behavior_weight_level is WeightLevel.SEQUENCE:
        if sequence_index is None:
            raise ValueError("sequence-level behaviour weights need sequence_index")
        n_seq = int(sequence_index.max().item()) + 1 if sequence_index.numel() else 0
        sums = torch.zeros(n_seq, dtype=log_w.dtype, device=log_w.device).index_add_(0, sequence_index, log_w)
        counts = torch.zeros(n_seq, dtype=log_w.dtype, device=log_w.device).index_add_(
            0, sequence_index, loss_mask.to(log_w.dtype)
        )
        log_w = (sums / counts.clamp(min=1.0))[sequence_index]
    raw = torch.exp(log_w)
    cap, floor = config.behavior_weight_cap, config.behavior_weight_floor
    if config.behavior_weight_mode is WeightMode.TRUNCATE:
        truncated = (raw > cap) & loss_mask
        masked = torch.zeros_like(loss_mask)
        applied = torch.clamp(raw, max=cap)
    else:
        masked = ((raw > cap) | (raw < floor)) & loss_mask
        truncated = torch.zeros_like(loss_mask)
        applied = torch.where(masked, torch.zeros_like(raw), raw)
    return raw, applied, masked, truncated


def policy_loss(
    logprobs: torch.Tensor,
    proximal_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    num_tokens: float,
    config: LossConfig = LossConfig(),
    sequence_index: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """Loss (a scalar, this call's share of the global token mean) and its stats.

    All tensors are flat and aligned per token. ``loss_mask`` is bool; ``num_tokens`` is the number of
    loss tokens in the whole batch (all micro-batches), so the sum of the returned losses over the
    micro-batches is the batch's token mean. ``sequence_index`` names each token's sequence (needed
    for sequence-level weights).
    """
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    shape = logprobs.shape
    for name, t in (("proximal", proximal_logprobs), ("behavior", behavior_logprobs),
                    ("advantages", advantages), ("loss_mask", loss_mask)):
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logprobs {tuple(shape)}")
    mask = loss_mask.bool()
    maskf = mask.to(logprobs.dtype)
    proximal_logprobs = proximal_logprobs.detach()
    behavior_logprobs = behavior_logprobs.detach()

    ratio = torch.exp(torch.clamp(logprobs - proximal_logprobs, -20.0, 20.0))
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - config.clip_low, 1.0 + config.clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    clipped = (pg_clipped > pg_unclipped) & mask
    if config.dual_clip is not None:
        pg_dual = -advantages * config.dual_clip
        dual = (advantages < 0) & (pg_dual < pg) & mask
        pg = torch.where(advantages < 0, torch.minimum(pg, pg_dual), pg)
    else:
        dual = torch.zeros_like(mask)

    with torch.no_grad():
        if config.behavior_correction:
            raw_w, w, w_masked, w_truncated = behavior_weights(
                proximal_logprobs, behavior_logprobs, mask, sequence_index, config
            )
        else:
            raw_w = w = torch.ones_like(proximal_logprobs)
            w_masked = w_truncated = torch.zeros_like(mask)
        log_r = torch.clamp(proximal_logprobs - behavior_logprobs, -20.0, 20.0)
        behavior_kl = torch.exp(log_r) - log_r - 1.0
    pg = pg * w

    per_token = pg
    kl = None
    if ref_logprobs is not None and config.kl_coef > 0:
        kl = k3_kl(logprobs, ref_logprobs.detach())
        per_token = per_token + config.kl_coef * kl
    if entropy is not None and config.entropy_coef > 0:
        per_token = per_token - config.entropy_coef * entropy
    loss = (per_token * maskf).sum() / num_tokens

    with torch.no_grad():
        n = int(mask.sum().item())
        stats = LossStats(
            num_tokens=n,
            pg_loss_sum=float((pg * maskf).sum()),
            kl_ref_sum=float((kl * maskf).sum()) if kl is not None else 0.0,
            entropy_sum=float((entropy * maskf).sum()) if entropy is not None else 0.0,
            clipped=int(clipped.sum()),
            dual_clipped=int(dual.sum()),
            weight_sum=float((w * maskf).sum()),
            weight_min=float(raw_w[mask].min()) if n else math.inf,
            weight_max=float(raw_w[mask].max()) if n else -math.inf,
            weight_masked=int(w_masked.sum()),
            weight_truncated=int(w_truncated.sum()),
            behavior_kl_sum=float((behavior_kl * maskf).sum()),
        )
    return loss, stats
