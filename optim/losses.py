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

import enum
import math
from dataclasses import dataclass, fields

import torch


class WeightLevel(enum.StrEnum):
    """Granularity of the behaviour importance weight."""

    TOKEN = "token"
    """One weight per token: proximal/behaviour of that token."""
    SEQUENCE = "sequence"
    """One weight per sequence: the geometric mean of its token weights (a product over thousands of
    tokens is numerically degenerate; GSPO and SkyRL's geometric mask use the same mean)."""


class WeightMode(enum.StrEnum):
    """What happens to a behaviour weight outside its bounds."""

    TRUNCATE = "truncate"
    """min(weight, cap): truncated importance sampling (TIS)."""
    MASK = "mask"
    """Weights outside [floor, cap] zero the policy-gradient term of their tokens (or sequences)."""


@dataclass(frozen=True, slots=True)
class LossConfig:
    """Loss hyper-parameters; defaults are paper.md §2.2 / §7 values where the paper has one."""

    clip_low: float = 0.2
    """PPO ratio lower clip: 1 - clip_low (paper ε_low)."""
    clip_high: float = 0.28
    """PPO ratio upper clip: 1 + clip_high (paper ε_high, DAPO clip-higher)."""
    dual_clip: float | None = 10.0
    """Dual-clip constant c for negative advantages (released config); None disables it."""
    behavior_correction: bool = True
    """Multiply by the behaviour weight proximal/behaviour; False trusts the engine's logprobs as-is."""
    behavior_weight_cap: float = 2.0
    """Upper bound of the behaviour weight (verl's ``rollout_is_threshold`` and slime's TIS default)."""
    behavior_weight_floor: float = 0.0
    """Lower bound, used only by ``WeightMode.MASK`` (truncation only caps from above)."""
    behavior_weight_level: WeightLevel = WeightLevel.TOKEN
    """Token- or sequence-level behaviour weight."""
    behavior_weight_mode: WeightMode = WeightMode.TRUNCATE
    """Truncate or mask out-of-bound behaviour weights."""
    kl_coef: float = 0.1
    """β of the k3 ("low_var_kl") KL to the reference policy; 0 skips the reference forward pass."""
    entropy_coef: float = 0.001
    """Weight of the entropy bonus (subtracted from the loss)."""

    def __post_init__(self) -> None:
        if not 0 <= self.clip_low < 1:
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {self.dual_clip}")
        if self.behavior_weight_cap <= 0:
            raise ValueError(f"behavior_weight_cap must be > 0, got {self.behavior_weight_cap}")
        if not 0 <= self.behavior_weight_floor < self.behavior_weight_cap:
            raise ValueError("behavior_weight_floor must be in [0, behavior_weight_cap)")
        if self.kl_coef < 0 or self.entropy_coef < 0:
            raise ValueError("kl_coef and entropy_coef must be >= 0")


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
